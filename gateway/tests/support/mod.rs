//! Test support: a gateway on a free port on its own nats-server ([`spawn_app`]), and a small
//! Socket.IO client speaking Engine.IO v4 over WebSocket ([`Client`]).

#![allow(dead_code)] // Each test file uses a part of it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatify_gateway::startup::Application;
use chatify_shared::Settings;
use chatify_shared::subjects::HISTORY_SUBJECT;
use chatify_shared::testing::NatsServer;
use chatify_shared::wire::HistoryPage;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

pub type TestResult = Result<(), Box<dyn std::error::Error>>;
pub type Error = Box<dyn std::error::Error>;

/// How long a test waits for something that should come.
pub const WAIT: Duration = Duration::from_secs(3);

pub struct TestApp {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    pub nats: NatsServer,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A Socket.IO client connected over WebSocket.
    pub async fn client(&self) -> Result<Client, Error> {
        Client::connect(self.addr, None).await
    }

    /// Answers history queries with empty pages, as a persister with no messages would.
    pub async fn answer_history_with_nothing(&self) -> TestResult {
        let nats = async_nats::connect(&self.nats.url).await?;
        let mut queries = nats.subscribe(HISTORY_SUBJECT).await?;
        nats.flush().await?;
        tokio::spawn(async move {
            while let Some(query) = queries.next().await {
                let empty = HistoryPage::default();
                if let (Some(reply), Ok(payload)) = (query.reply, serde_json::to_vec(&empty)) {
                    let _ = nats.publish(reply, payload.into()).await;
                }
            }
        });
        Ok(())
    }
}

/// A gateway on a free port, on its own nats-server, with `configure` applied to its settings.
pub async fn spawn_app_with(configure: impl FnOnce(&mut Settings)) -> Result<TestApp, Error> {
    let nats = NatsServer::start().await?;
    let mut settings = Settings::default();
    settings.nats.url = nats.url.clone();
    settings.nats.request_timeout_ms = 500;
    settings.gateway.port = 0;
    configure(&mut settings);
    // As a persister would: a gateway only opens the messages stream.
    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await?);
    chatify_shared::bus::ensure_messages_stream(&js, &settings.stream).await?;
    let app = Application::build(settings).await?;
    let addr = app.local_addr()?;
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    Ok(TestApp {
        addr,
        http: reqwest::Client::new(),
        nats,
    })
}

/// A gateway on a free port, on its own nats-server.
pub async fn spawn_app() -> Result<TestApp, Error> {
    spawn_app_with(|_| {}).await
}

/// A Socket.IO client of the default namespace over WebSocket. Events the server sends are
/// kept in arrival order; acks are matched to their requests.
pub struct Client {
    /// Text frames to the server.
    out: mpsc::UnboundedSender<String>,
    /// Events received, oldest first: (name, first argument).
    events: mpsc::UnboundedReceiver<(String, Value)>,
    /// Acks being waited for, by ack id.
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>,
    /// The next ack id.
    next_ack: u64,
    /// Events read from `events` by waits that were looking for something else.
    seen: Vec<(String, Value)>,
}

impl Client {
    pub async fn connect(addr: SocketAddr, auth: Option<Value>) -> Result<Self, Error> {
        let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        let (mut sink, mut stream) = ws.split();
        let open = next_text(&mut stream).await?;
        if !open.starts_with('0') {
            return Err(format!("expected an Engine.IO open packet, got {open:?}").into());
        }
        let connect = match auth {
            Some(auth) => format!("40{auth}"),
            None => "40".to_owned(),
        };
        sink.send(Message::text(connect)).await?;
        loop {
            match next_text(&mut stream).await?.as_str() {
                "2" => sink.send(Message::text("3")).await?,
                answer if answer.starts_with("40") => break,
                answer => {
                    return Err(format!("the namespace refused the connection: {answer:?}").into());
                }
            }
        }
        let (out, mut outgoing) = mpsc::unbounded_channel::<String>();
        let (events_tx, events) = mpsc::unbounded_channel();
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>> = Arc::default();
        tokio::spawn(async move {
            while let Some(frame) = outgoing.recv().await {
                if sink.send(Message::text(frame)).await.is_err() {
                    break;
                }
            }
        });
        let (acks, pongs) = (pending.clone(), out.clone());
        tokio::spawn(async move {
            while let Some(Ok(Message::Text(frame))) = stream.next().await {
                let frame = frame.as_str();
                if frame == "2" {
                    let _ = pongs.send("3".to_owned());
                } else if let Some(packet) = frame.strip_prefix("42") {
                    if let Ok(Value::Array(mut args)) = serde_json::from_str(packet)
                        && let Some(Value::String(name)) = args.first().cloned()
                    {
                        let first = if args.len() > 1 {
                            args.swap_remove(1)
                        } else {
                            Value::Null
                        };
                        let _ = events_tx.send((name, first));
                    }
                } else if let Some(packet) = frame.strip_prefix("43") {
                    let digits = packet.bytes().take_while(u8::is_ascii_digit).count();
                    let (id, args) = packet.split_at(digits);
                    if let (Ok(id), Ok(Value::Array(mut args))) =
                        (id.parse::<u64>(), serde_json::from_str(args))
                        && let Some(waiting) = acks.lock().ok().and_then(|mut p| p.remove(&id))
                    {
                        let reply = if args.is_empty() {
                            Value::Null
                        } else {
                            args.swap_remove(0)
                        };
                        let _ = waiting.send(reply);
                    }
                }
            }
        });
        Ok(Self {
            out,
            events,
            pending,
            next_ack: 0,
            seen: Vec::new(),
        })
    }

    /// Sends an event without an ack callback.
    pub fn emit(&self, event: &str, data: Value) -> TestResult {
        self.out.send(format!("42{}", json!([event, data])))?;
        Ok(())
    }

    /// Sends an event and waits for its ack.
    pub async fn ack(&mut self, event: &str, data: Value) -> Result<Value, Error> {
        let receiver = self.emit_with_ack(event, data)?;
        Ok(tokio::time::timeout(WAIT, receiver)
            .await
            .map_err(|_| format!("no ack for {event} within {WAIT:?}"))??)
    }

    /// Sends an event with an ack callback; the ack arrives on the receiver.
    pub fn emit_with_ack(
        &mut self,
        event: &str,
        data: Value,
    ) -> Result<oneshot::Receiver<Value>, Error> {
        let id = self.next_ack;
        self.next_ack += 1;
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| "the ack table is poisoned")?
            .insert(id, tx);
        self.out.send(format!("42{id}{}", json!([event, data])))?;
        Ok(rx)
    }

    /// The first event named `name` whose payload satisfies `accept`, received already or
    /// within [`WAIT`].
    pub async fn wait_for(
        &mut self,
        name: &str,
        accept: impl Fn(&Value) -> bool,
    ) -> Result<Value, Error> {
        if let Some(at) = self.seen.iter().position(|(n, v)| n == name && accept(v)) {
            return Ok(self.seen.remove(at).1);
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.events.recv()).await;
            match next {
                Ok(Some((n, v))) if n == name && accept(&v) => return Ok(v),
                Ok(Some(other)) => self.seen.push(other),
                Ok(None) => return Err(format!("disconnected while waiting for {name}").into()),
                Err(_) => {
                    return Err(format!(
                        "no {name} within {WAIT:?}; received meanwhile: {:?}",
                        self.seen
                    )
                    .into());
                }
            }
        }
    }

    /// Every event received within `quiet`, kept for later waits; returns those named `name`.
    pub async fn received_within(&mut self, name: &str, quiet: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + quiet;
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            self.seen.push(event);
        }
        self.seen
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

async fn next_text<S>(stream: &mut S) -> Result<String, Error>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match tokio::time::timeout(WAIT, stream.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => return Ok(text.as_str().to_owned()),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) => return Err("the connection closed".into()),
            Err(_) => return Err(format!("nothing from the server within {WAIT:?}").into()),
        }
    }
}
