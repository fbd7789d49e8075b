//! Graceful shutdown of client events: once shutdown starts, new events are answered
//! `unavailable` at once, and the gateway waits for the events already running to finish
//! (and answer) before it closes the sockets.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

#[derive(Default)]
pub struct Lifecycle {
    /// Set when shutdown starts.
    stopping: AtomicBool,
    /// Client events being handled now.
    running: AtomicUsize,
}

/// One running event; dropping it marks the event done.
pub struct Running<'a>(&'a Lifecycle);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Lifecycle {
    /// Registers an event, unless shutdown has started.
    pub fn begin(&self) -> Option<Running<'_>> {
        self.running.fetch_add(1, Ordering::SeqCst);
        if self.stopping.load(Ordering::SeqCst) {
            self.running.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Running(self))
    }

    /// Refuses new events from now on.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Waits until no event runs, or `limit` has passed.
    pub async fn idle(&self, limit: Duration) {
        let started = tokio::time::Instant::now();
        while self.running.load(Ordering::SeqCst) > 0 && started.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stopping_refuses_new_events_and_waits_for_running_ones() {
        let lifecycle = Lifecycle::default();
        let running = lifecycle.begin();
        assert!(running.is_some());
        lifecycle.stop();
        assert!(lifecycle.begin().is_none(), "no new events once stopping");
        let started = tokio::time::Instant::now();
        tokio::join!(lifecycle.idle(Duration::from_secs(5)), async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(running);
        });
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(100) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        // Nothing runs: returns at once.
        let started = tokio::time::Instant::now();
        lifecycle.idle(Duration::from_secs(5)).await;
        assert!(started.elapsed() < Duration::from_millis(50));
    }
}
