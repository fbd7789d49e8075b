//! A socket's outgoing queue. (Chatify patch, see vendor/README.md.)
//!
//! It replaces the bounded tokio `mpsc` channel upstream made for every socket: the channel's
//! shared state and its first block of slots are two allocations of about 800 bytes that every
//! connection pays for, while the queue is empty nearly all the time. This one lives in the
//! [`Socket`](crate::socket::Socket) itself and allocates only for packets waiting to be sent.
//!
//! It keeps what engineioxide relied on: a capacity, counted with the places reserved by
//! [`Permit`]s; [`TrySendError::Full`] and [`TrySendError::Closed`] as the channel gave them; one
//! reader at a time (the transport holding the socket's `internal_rx` lock, which every reading
//! method takes as proof); packets queued before [`Queue::close`] still read after it.
use std::{
    collections::VecDeque,
    pin::pin,
    sync::{Mutex, MutexGuard, PoisonError},
    task::{Context, Poll},
};

use futures_util::task::AtomicWaker;
use tokio::sync::{Notify, mpsc::error::TrySendError};

use engineioxide_core::{Packet, PacketBuf};

use crate::socket::{InternalRx, Queued};

/// A bounded FIFO of packet buffers with one reader.
#[derive(Debug)]
pub(crate) struct Queue {
    /// The packets and the bookkeeping of the capacity.
    state: Mutex<State>,
    /// The reader waiting for a packet, woken by each push and by the close.
    reader: AtomicWaker,
    /// Senders waiting for room and callers of [`Queue::closed`], woken when a place frees up
    /// in a full queue and when the queue closes.
    changed: Notify,
    /// How many packets (queued or reserved) the queue holds at most.
    capacity: usize,
    /// From how many bytes of queued packets on the queue counts as full.
    byte_capacity: usize,
}

#[derive(Debug, Default)]
struct State {
    /// The packets to send, oldest first.
    packets: VecDeque<Queued>,
    /// Places taken by permits not yet used.
    reserved: usize,
    /// Set once by [`Queue::close`]: no packet is accepted after it.
    closed: bool,
    /// Bytes of the queued packets ([`weight`]).
    bytes: usize,
}

impl State {
    fn is_full(&self, capacity: usize, byte_capacity: usize) -> bool {
        self.packets.len() + self.reserved >= capacity || self.bytes >= byte_capacity
    }

    fn push(&mut self, packets: Queued) {
        self.bytes += weight(&packets);
        self.packets.push_back(packets);
    }
}

/// What a packet buffer counts for against the byte capacity: its payloads' lengths.
fn weight(packets: &PacketBuf) -> usize {
    packets
        .iter()
        .map(|p| match p {
            Packet::Message(text) => text.len(),
            Packet::Binary(data) | Packet::BinaryV3(data) => data.len(),
            _ => 1,
        })
        .sum()
}

impl Queue {
    #[cfg(any(test, feature = "__test_harness"))]
    pub(crate) fn new(capacity: usize) -> Self {
        Self::with_byte_limit(capacity, usize::MAX)
    }

    /// A queue of at most `capacity` packets, full from `byte_capacity` bytes on.
    pub(crate) fn with_byte_limit(capacity: usize, byte_capacity: usize) -> Self {
        Self {
            state: Mutex::default(),
            reader: AtomicWaker::new(),
            changed: Notify::new(),
            capacity,
            byte_capacity,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `packets` unless the queue is full or closed.
    pub(crate) fn try_send(&self, packets: Queued) -> Result<(), TrySendError<Queued>> {
        let mut state = self.state();
        if state.closed {
            return Err(TrySendError::Closed(packets));
        }
        if state.is_full(self.capacity, self.byte_capacity) {
            return Err(TrySendError::Full(packets));
        }
        state.push(packets);
        drop(state);
        self.reader.wake();
        Ok(())
    }

    /// Queues `packets`, waiting for room; `Err` with them if the queue is closed.
    pub(crate) async fn send(&self, mut packets: Queued) -> Result<(), Queued> {
        loop {
            let mut changed = pin!(self.changed.notified());
            changed.as_mut().enable();
            match self.try_send(packets) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(back)) => return Err(back),
                Err(TrySendError::Full(back)) => packets = back,
            }
            changed.await;
        }
    }

    /// Takes a place in the queue for a packet buffer sent later through the permit.
    pub(crate) fn try_reserve(&self) -> Result<Permit<'_>, TrySendError<()>> {
        let mut state = self.state();
        if state.closed {
            return Err(TrySendError::Closed(()));
        }
        if state.is_full(self.capacity, self.byte_capacity) {
            return Err(TrySendError::Full(()));
        }
        state.reserved += 1;
        Ok(Permit { queue: self })
    }

    /// Whether the queue is closed: nothing can be sent any more.
    pub(crate) fn is_closed(&self) -> bool {
        self.state().closed
    }

    /// Waits until the queue is closed.
    pub(crate) async fn closed(&self) {
        loop {
            let mut changed = pin!(self.changed.notified());
            changed.as_mut().enable();
            if self.is_closed() {
                return;
            }
            changed.await;
        }
    }

    /// Refuses every packet from now on; those already queued can still be read.
    pub(crate) fn close(&self, _reader: &mut InternalRx) {
        self.state().closed = true;
        self.changed.notify_waiters();
        self.reader.wake();
    }

    /// The oldest packet buffer, `None` once the queue is closed and empty, or pending (the
    /// task woken by the next push or the close).
    pub(crate) fn poll_recv(
        &self,
        _reader: &mut InternalRx,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Queued>> {
        if let Some(ready) = self.pop() {
            return Poll::Ready(ready);
        }
        self.reader.register(cx.waker());
        // Again: a push between the first look and the registration woke nobody.
        match self.pop() {
            Some(ready) => Poll::Ready(ready),
            None => Poll::Pending,
        }
    }

    /// The oldest packet buffer, waiting for one; `None` once the queue is closed and empty.
    #[cfg(any(test, feature = "__test_harness"))]
    pub(crate) async fn recv(&self, reader: &mut InternalRx) -> Option<Queued> {
        std::future::poll_fn(|cx| self.poll_recv(reader, cx)).await
    }

    /// `Some` with the oldest packet buffer, or with `None` if the queue is closed and empty;
    /// `None` if it is empty and open.
    fn pop(&self) -> Option<Option<Queued>> {
        let mut state = self.state();
        let was_full = state.is_full(self.capacity, self.byte_capacity);
        match state.packets.pop_front() {
            Some(packets) => {
                state.bytes -= weight(&packets);
                if state.packets.is_empty() && state.packets.capacity() > SHRINK_ABOVE {
                    // A burst that filled the queue does not keep its room for the socket's life.
                    state.packets = VecDeque::new();
                }
                drop(state);
                if was_full {
                    self.changed.notify_waiters();
                }
                Some(Some(packets))
            }
            None if state.closed => Some(None),
            None => None,
        }
    }

    /// Gives back a reserved place, with or without `packets` for it.
    fn release(&self, packets: Option<Queued>) {
        let mut state = self.state();
        let was_full = state.is_full(self.capacity, self.byte_capacity);
        state.reserved -= 1;
        let pushed = match packets {
            Some(packets) if !state.closed => {
                state.push(packets);
                true
            }
            _ => false,
        };
        drop(state);
        if pushed {
            self.reader.wake();
        } else if was_full {
            self.changed.notify_waiters();
        }
    }
}

/// The room an emptied queue may keep: a few packet buffers' pointers.
const SHRINK_ABOVE: usize = 8;

/// A place reserved in a [`Queue`]; given back when dropped unused.
#[derive(Debug)]
pub(crate) struct Permit<'a> {
    queue: &'a Queue,
}

impl Permit<'_> {
    /// Queues `packets` in the reserved place (dropped if the queue closed since).
    pub(crate) fn send(self, packets: Queued) {
        let queue = self.queue;
        std::mem::forget(self);
        queue.release(Some(packets));
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.queue.release(None);
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use engineioxide_core::{Packet, PacketBuf};
    use smallvec::smallvec;

    use super::*;

    fn packet(text: &str) -> Queued {
        Box::new(smallvec![Packet::Message(text.to_owned().into())])
    }

    fn text(packets: &PacketBuf) -> String {
        match &packets[0] {
            Packet::Message(msg) => msg.to_string(),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn reader() -> InternalRx {
        InternalRx::default()
    }

    #[tokio::test]
    async fn packets_come_out_in_order() {
        let queue = Queue::new(4);
        let mut rx = reader();
        for t in ["a", "b", "c"] {
            queue.try_send(packet(t)).unwrap();
        }
        for t in ["a", "b", "c"] {
            assert_eq!(text(&queue.recv(&mut rx).await.unwrap()), t);
        }
    }

    #[test]
    fn a_full_queue_refuses_and_permits_count() {
        let queue = Queue::new(2);
        queue.try_send(packet("a")).unwrap();
        let permit = queue.try_reserve().unwrap();
        assert!(matches!(
            queue.try_send(packet("b")),
            Err(TrySendError::Full(_))
        ));
        assert!(matches!(queue.try_reserve(), Err(TrySendError::Full(()))));
        drop(permit);
        queue.try_send(packet("b")).unwrap();
    }

    #[tokio::test]
    async fn a_permit_sends_in_its_place() {
        let queue = Queue::new(2);
        let mut rx = reader();
        let permit = queue.try_reserve().unwrap();
        permit.send(packet("reserved"));
        queue.try_send(packet("after")).unwrap();
        assert_eq!(text(&queue.recv(&mut rx).await.unwrap()), "reserved");
        assert_eq!(text(&queue.recv(&mut rx).await.unwrap()), "after");
        assert!(
            queue.try_send(packet("c")).is_ok(),
            "the places are free again"
        );
    }

    #[tokio::test]
    async fn a_closed_queue_refuses_but_gives_what_it_holds() {
        let queue = Queue::new(4);
        let mut rx = reader();
        queue.try_send(packet("kept")).unwrap();
        let permit = queue.try_reserve().unwrap();
        queue.close(&mut rx);
        assert!(queue.is_closed());
        assert!(matches!(
            queue.try_send(packet("x")),
            Err(TrySendError::Closed(_))
        ));
        assert!(matches!(queue.try_reserve(), Err(TrySendError::Closed(()))));
        permit.send(packet("late"));
        assert_eq!(text(&queue.recv(&mut rx).await.unwrap()), "kept");
        assert!(queue.recv(&mut rx).await.is_none());
        assert!(queue.send(packet("y")).await.is_err());
        queue.closed().await;
    }

    #[tokio::test]
    async fn the_reader_is_woken_by_a_push_and_by_the_close() {
        let queue = Arc::new(Queue::new(4));
        let reading = tokio::spawn({
            let queue = queue.clone();
            async move {
                let mut rx = reader();
                let first = queue.recv(&mut rx).await.map(|p| text(&p));
                let second = queue.recv(&mut rx).await.map(|p| text(&p));
                (first, second)
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        queue.try_send(packet("a")).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        queue.close(&mut reader());
        let (first, second) = tokio::time::timeout(Duration::from_secs(1), reading)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.as_deref(), Some("a"));
        assert_eq!(second, None);
    }

    #[tokio::test]
    async fn a_sender_waits_for_room() {
        let queue = Arc::new(Queue::new(1));
        queue.try_send(packet("a")).unwrap();
        let sending = tokio::spawn({
            let queue = queue.clone();
            async move { queue.send(packet("b")).await.is_ok() }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!sending.is_finished(), "the queue is full");
        let mut rx = reader();
        assert_eq!(text(&queue.recv(&mut rx).await.unwrap()), "a");
        let sent = tokio::time::timeout(Duration::from_secs(1), sending)
            .await
            .unwrap()
            .unwrap();
        assert!(sent);
        assert_eq!(text(&queue.recv(&mut rx).await.unwrap()), "b");
    }

    #[tokio::test]
    async fn closed_resolves_when_the_queue_closes() {
        let queue = Arc::new(Queue::new(1));
        let waiting = tokio::spawn({
            let queue = queue.clone();
            async move { queue.closed().await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiting.is_finished());
        queue.close(&mut reader());
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_queue_holding_its_bytes_refuses_until_they_are_read() {
        let queue = Queue::with_byte_limit(128, 10);
        let mut rx = reader();
        queue.try_send(packet("123456")).unwrap();
        // Under the limit: taken, though it goes past it.
        queue.try_send(packet("789012")).unwrap();
        assert!(matches!(queue.try_send(packet("x")), Err(TrySendError::Full(_))));
        assert!(matches!(queue.try_reserve(), Err(TrySendError::Full(()))));
        assert_eq!(text(&queue.recv(&mut rx).await.unwrap()), "123456");
        queue.try_send(packet("x")).unwrap();
        assert_eq!(text(&queue.recv(&mut rx).await.unwrap()), "789012");
        assert_eq!(text(&queue.recv(&mut rx).await.unwrap()), "x");
        assert_eq!(queue.state().bytes, 0);
    }

    #[test]
    fn an_emptied_queue_gives_back_a_burst_s_room() {
        let queue = Queue::new(128);
        let mut rx = reader();
        for _ in 0..100 {
            queue.try_send(packet("x")).unwrap();
        }
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        while let Poll::Ready(Some(_)) = queue.poll_recv(&mut rx, &mut cx) {}
        assert!(queue.state().packets.capacity() <= SHRINK_ABOVE);
    }
}
