//! chatify-loadgen: drives Chatify (or the Node socket.io reference peer) over Engine.IO v4 /
//! Socket.IO WebSockets and prints a JSON summary on stdout, progress on stderr.
//! See bench/README.md.

mod client;
mod harper;
mod proto;
mod publish;
mod report;
mod scenario;
mod stats;

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "chatify-loadgen",
    about = "Load generator for Chatify and the socket.io reference peer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options every load scenario takes.
#[derive(Args, Clone, Debug)]
pub struct Common {
    /// Server URL (http://IP:PORT); repeat to spread connections over several servers.
    #[arg(long = "url", required = true)]
    pub urls: Vec<String>,
    /// Server process whose CPU time and RSS are read from /proc; repeatable.
    #[arg(long = "pid")]
    pub pids: Vec<u32>,
    /// Source addresses, round-robin: `A-B` (IPv4 range), comma list, or `none`.
    #[arg(long, default_value = "127.0.0.2-127.0.0.9")]
    pub sources: String,
    /// JWT sent as `auth: { token }` in the Socket.IO connect (when the server has auth on).
    #[arg(long, env = "CHATIFY_LOADGEN_TOKEN")]
    pub auth_token: Option<String>,
    /// Concurrent handshakes while connecting.
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,
    /// Joins in flight at once (each fans out notices to the whole room).
    #[arg(long, default_value_t = 16)]
    pub join_concurrency: usize,
    /// Runtime threads (1: a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Names of the `--pid` processes, comma separated, in the same order (e.g.
    /// `gateway1,gateway2,nats,persister`); trailing digits group them (`gateway`).
    #[arg(long, default_value = "")]
    pub pid_names: String,
    /// Free text copied into the summary (for example `chatify` or `reference`).
    #[arg(long, default_value = "")]
    pub label: String,
    /// Prefix of the room names (default: a random run id).
    #[arg(long)]
    pub run_id: Option<String>,
    /// Seconds to wait for missing acks and deliveries after the last send.
    #[arg(long, default_value_t = 10.0)]
    pub drain: f64,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl Common {
    /// The `--pid-names`, one per `--pid` (empty when not given).
    pub fn pid_names(&self) -> Vec<&str> {
        self.pid_names.split(',').map(str::trim).collect()
    }
}

#[derive(Subcommand)]
enum Command {
    /// Idle connections, each in one room: RSS per connection.
    Idle {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        #[arg(long, default_value_t = 100)]
        rooms: usize,
        /// Seconds to stay idle after everyone joined, before RSS is read.
        #[arg(long, default_value_t = 10.0)]
        hold: f64,
    },
    /// One big room; a few members send at a fixed aggregate rate.
    Room {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        load: scenario::Load,
        #[arg(long, default_value_t = 1000)]
        members: usize,
    },
    /// Many small rooms; with several --url, each room's members are spread over them.
    Rooms {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        load: scenario::Load,
        #[arg(long, default_value_t = 100)]
        rooms: usize,
        #[arg(long, default_value_t = 10)]
        members: usize,
        #[command(flatten)]
        bg: scenario::Background,
    },
    /// Acked sends until HarperDB stored them: stored messages/s and publish-to-stored lag.
    Persister {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        load: scenario::Load,
        #[command(flatten)]
        db: scenario::DbArgs,
        /// Sending connections.
        #[arg(long, default_value_t = 200)]
        senders: usize,
        /// Rooms the senders are spread over (0: one room per sender, so no fan-out).
        #[arg(long, default_value_t = 0)]
        rooms: usize,
        /// The persister's /metrics URL (its stored counter times the lag).
        #[arg(long, env = "CHATIFY_PERSISTER_URL")]
        persister_url: String,
        /// Milliseconds between reads of the stored counter.
        #[arg(long, default_value_t = 20)]
        poll_ms: u64,
        /// Shell command run before sending (e.g. stop the persister) and one run after every
        /// send was acked (start it): the backlog's drain then gives the persister's ceiling.
        #[arg(long)]
        pause_cmd: Option<String>,
        #[arg(long)]
        resume_cmd: Option<String>,
        /// Seconds to wait for everything to be stored.
        #[arg(long, default_value_t = 120.0)]
        store_timeout: f64,
        /// Publish straight into JetStream at this NATS URL, as a gateway stores a send,
        /// instead of sending through the gateways (`--url` and `--senders` then only name the
        /// rooms): the persister's own lag, without clients and gateways on the same cores.
        #[arg(long)]
        nats_url: Option<String>,
        /// The NATS user to publish as (a gateway's: only gateways may publish messages).
        #[arg(long, env = "CHATIFY_NATS__USER", default_value = "")]
        nats_user: String,
        /// Its password (from the environment, so that it shows in no process list).
        #[arg(
            long,
            env = "CHATIFY_NATS__PASSWORD",
            hide_env_values = true,
            default_value = ""
        )]
        nats_password: String,
    },
    /// Inserts the persister's record shape straight into HarperDB: the write ceiling.
    HarperdbDirect {
        #[command(flatten)]
        db: scenario::DbArgs,
        #[arg(long, default_value_t = 100_000)]
        records: usize,
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// Connections, one insert in flight on each, each replaced by a fresh one after 64
        /// batches, as the persister's writer lanes (`persister.write_connections`, 2).
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Rooms the records are spread over, in turn (the drain's 1,000 senders each have one).
        #[arg(long, default_value_t = 1000)]
        rooms: usize,
        /// Table to write (created with the persister's schema).
        #[arg(long, default_value = "bench_direct")]
        direct_table: String,
        #[arg(long, default_value = "")]
        label: String,
        #[arg(long)]
        pid: Vec<u32>,
    },
    /// `get_history` (latest N of a room) at a fixed rate.
    History {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        db: scenario::DbArgs,
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        #[arg(long, default_value_t = 30.0)]
        duration: f64,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Requesting connections.
        #[arg(long, default_value_t = 10)]
        conns: usize,
        /// Room to query (default: `<run id>-history`).
        #[arg(long)]
        room: Option<String>,
        /// Messages to store in the room first.
        #[arg(long, default_value_t = 0)]
        seed: usize,
        /// How: `harperdb` (direct inserts, Chatify only; done before any client joins, as
        /// if the messages had been stored long ago) or `sends` (through the server).
        #[arg(long, default_value = "harperdb")]
        seed_via: String,
        /// Messages the room is known to hold (default: --seed): an answer with fewer than
        /// min(--limit, this) messages counts as an error, not as a fast answer.
        #[arg(long)]
        room_holds: Option<usize>,
    },
    /// A reaction storm: every member of one room reacts to one message within a window; the
    /// final counts are checked, and the cost compared with as many plain messages.
    Storm {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        storm: scenario::StormArgs,
    },
    /// Medians and ratios of the summaries in a directory: writes the results table.
    Report {
        /// Directory of `<system>-<scenario>-<n>.json` summaries.
        #[arg(long)]
        dir: PathBuf,
        /// Markdown file to write.
        #[arg(long)]
        out: PathBuf,
        /// Text for the header (machine, commit, command).
        #[arg(long, default_value = "")]
        header: String,
    },
}

/// Parses `--sources`.
pub fn parse_sources(s: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
    if s == "none" || s.is_empty() {
        return Ok(Vec::new());
    }
    if let Some((a, b)) = s.split_once('-') {
        let (a, b): (Ipv4Addr, Ipv4Addr) = (a.parse()?, b.parse()?);
        let (a, b) = (u32::from(a), u32::from(b));
        if b < a || b - a > 255 {
            bail!("bad source range {s}");
        }
        return Ok((a..=b).map(Ipv4Addr::from).collect());
    }
    s.split(',')
        .map(|a| {
            a.trim()
                .parse()
                .with_context(|| format!("bad source address {a}"))
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Idle { common, .. }
        | Command::Room { common, .. }
        | Command::Rooms { common, .. }
        | Command::Persister { common, .. }
        | Command::History { common, .. }
        | Command::Storm { common, .. } => common.threads,
        _ => 1,
    };
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    let summary = rt.block_on(async move {
        match cli.command {
            Command::Idle {
                common,
                conns,
                rooms,
                hold,
            } => scenario::idle(common, conns, rooms, hold).await,
            Command::Room {
                common,
                load,
                members,
            } => {
                scenario::rooms(
                    common,
                    load,
                    1,
                    members,
                    "room",
                    scenario::Background::default(),
                )
                .await
            }
            Command::Rooms {
                common,
                load,
                rooms,
                members,
                bg,
            } => scenario::rooms(common, load, rooms, members, "rooms", bg).await,
            Command::Persister {
                common,
                load,
                db,
                senders,
                rooms,
                persister_url,
                poll_ms,
                pause_cmd,
                resume_cmd,
                store_timeout,
                nats_url,
                nats_user,
                nats_password,
            } => {
                scenario::persister(scenario::PersisterArgs {
                    common,
                    load,
                    db,
                    senders,
                    rooms,
                    persister_url,
                    poll_ms,
                    pause_cmd,
                    resume_cmd,
                    store_timeout,
                    nats_url,
                    nats_user,
                    nats_password,
                })
                .await
            }
            Command::HarperdbDirect {
                db,
                records,
                batch,
                concurrency,
                size,
                rooms,
                direct_table,
                label,
                pid,
            } => {
                scenario::harperdb_direct(
                    db,
                    records,
                    batch,
                    concurrency,
                    size,
                    rooms,
                    &direct_table,
                    &label,
                    &pid,
                )
                .await
            }
            Command::History {
                common,
                db,
                rate,
                duration,
                limit,
                conns,
                room,
                seed,
                seed_via,
                room_holds,
            } => {
                let holds = room_holds.unwrap_or(seed);
                scenario::history(
                    common, db, rate, duration, limit, conns, room, seed, &seed_via, holds,
                )
                .await
            }
            Command::Storm { common, storm } => scenario::storm(common, storm).await,
            Command::Report { dir, out, header } => {
                report::write(&dir, &out, &header).map(|()| serde_json::Value::Null)
            }
        }
    });
    // Connection tasks still open are dropped with the runtime: no waiting for their sockets.
    rt.shutdown_background();
    let summary = summary?;
    if !summary.is_null() {
        println!("{summary}");
        if summary.get("ok").and_then(serde_json::Value::as_bool) == Some(false) {
            std::process::exit(3);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_has_no_clashing_options() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn sources() {
        let v = parse_sources("127.0.0.2-127.0.0.9").unwrap_or_default();
        assert_eq!(v.len(), 8);
        assert_eq!(v[0], Ipv4Addr::new(127, 0, 0, 2));
        assert!(parse_sources("none").unwrap_or_default().is_empty());
        assert_eq!(
            parse_sources("127.0.0.3,127.0.0.4")
                .unwrap_or_default()
                .len(),
            2
        );
        assert!(parse_sources("127.0.0.9-127.0.0.2").is_err());
        assert!(parse_sources("x").is_err());
    }
}
