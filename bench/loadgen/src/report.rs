//! The results table: medians of repeated runs, ratios Chatify / reference, each target
//! met or missed. Summaries are files `<system>-<key>-<repeat>.json` with system `chatify` or
//! `reference` (bench/run.sh writes them).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde_json::Value;

use crate::stats::median;

/// How a row's figures are judged.
#[derive(Debug, Clone, Copy)]
enum Check {
    /// Chatify ≤ the value.
    AtMost(f64),
    /// Chatify ≥ the value.
    AtLeast(f64),
    /// Chatify / reference ≤ the value.
    RatioAtMost(f64),
    /// Chatify < reference.
    Below,
    /// Chatify ≤ reference.
    NotAbove,
    /// Only reported.
    Info,
}

struct Row {
    target: &'static str,
    what: &'static str,
    key: &'static str,
    path: &'static [&'static str],
    checks: &'static [Check],
    /// Compare with another figure instead of the reference: (key, path, system).
    against: Option<(&'static str, &'static [&'static str], &'static str)>,
}

const ROWS: &[Row] = &[
    Row {
        target: "1. Idle: 10,000 connections in 1,000 rooms",
        what: "gateway RSS per idle connection (KiB)",
        key: "idle",
        path: &["server", "rss_kib_per_connection"],
        checks: &[Check::AtMost(8.0), Check::RatioAtMost(0.5)],
        against: None,
    },
    Row {
        target: "1. Idle: 10,000 connections in 1,000 rooms",
        what: "idle CPU (µs per connection-second)",
        key: "idle",
        path: &["server", "idle_cpu_us_per_connection_second"],
        checks: &[Check::Info],
        against: None,
    },
    Row {
        target: "2. Big room: 1,000 members, 100-byte messages",
        what: "server CPU per delivery (µs)",
        key: "room",
        path: &["server", "cpu_us_per_delivery"],
        checks: &[Check::RatioAtMost(0.25)],
        against: None,
    },
    Row {
        target: "2. Big room: 1,000 members, 100-byte messages",
        what: "delivery p99 (ms) at the reference's highest sustained rate",
        key: "room",
        path: &["delivery_latency", "p99_ms"],
        checks: &[Check::Below],
        against: None,
    },
    Row {
        target: "2. Big room: 1,000 members, 100-byte messages",
        what: "server CPU per delivery (µs) at 20,000 deliveries/s",
        key: "room20k",
        path: &["server", "cpu_us_per_delivery"],
        checks: &[Check::Info],
        against: None,
    },
    Row {
        target: "2. Big room: 1,000 members, 100-byte messages",
        what: "delivery p99 (ms) at 20,000 deliveries/s",
        key: "room20k",
        path: &["delivery_latency", "p99_ms"],
        checks: &[Check::Info],
        against: None,
    },
    Row {
        target: "2. Big room: 1,000 members, 100-byte messages",
        what: "deliveries/s achieved at the reference's highest sustained rate",
        key: "room",
        path: &["delivery_rate"],
        checks: &[Check::Info],
        against: None,
    },
    Row {
        target: "3. Across gateways: 100 rooms × 10 members on two servers",
        what: "CPU per delivery, all server processes (µs)",
        key: "rooms2",
        path: &["server", "cpu_us_per_delivery"],
        checks: &[Check::RatioAtMost(0.5)],
        against: None,
    },
    Row {
        target: "3. Across gateways: 100 rooms × 10 members on two servers",
        what: "delivery p99 (ms) at 10,000 deliveries/s",
        key: "rooms2",
        path: &["delivery_latency", "p99_ms"],
        checks: &[Check::NotAbove],
        against: None,
    },
    Row {
        target: "4. Persister",
        what: "HarperDB direct inserts (records/s, batch 500, 1,000 rooms, 2 connections, one insert each, each replaced after 64 batches, as the persister)",
        key: "direct",
        path: &["stored_per_s"],
        checks: &[Check::Info],
        against: None,
    },
    Row {
        target: "4. Persister",
        what: "the same, 1 connection (one HarperDB thread)",
        key: "direct-c1",
        path: &["stored_per_s"],
        checks: &[Check::Info],
        against: None,
    },
    Row {
        target: "4. Persister",
        what: "persister stored messages/s (backlog drain)",
        key: "persister-max",
        path: &["stored_per_s"],
        checks: &[Check::AtLeast(20_000.0), Check::RatioAtMost(f64::INFINITY)],
        against: Some(("direct", &["stored_per_s"], "chatify")),
    },
    Row {
        target: "4. Persister",
        what: "publish-to-stored lag p99 (ms) at half that rate, published straight into JetStream (the persister's own lag)",
        key: "persister-lag-js",
        path: &["store_lag", "p99_ms"],
        checks: &[Check::AtMost(250.0)],
        against: None,
    },
    Row {
        target: "4. Persister",
        what: "the same lag, sent by WebSocket clients through both gateways (the whole path on the same cores)",
        key: "persister-lag",
        path: &["store_lag", "p99_ms"],
        checks: &[Check::AtMost(250.0)],
        against: None,
    },
    Row {
        target: "5. History: latest 50 at 100 requests/s",
        what: "get_history p99 (ms), end to end",
        key: "history",
        path: &["history_latency", "p99_ms"],
        checks: &[Check::AtMost(10.0)],
        against: None,
    },
    Row {
        target: "6. Cost follows interest: 100 rooms × 10 members on one server, 9,900 more rooms busy on another",
        what: "measured server's CPU per delivery in its rooms (µs), only its 100 rooms active",
        key: "interest-base",
        path: &["server", "cpu_us_per_delivery"],
        checks: &[Check::Info],
        against: None,
    },
    Row {
        target: "6. Cost follows interest: 100 rooms × 10 members on one server, 9,900 more rooms busy on another",
        what: "the same, with the 9,900 other rooms busy",
        key: "interest-bg",
        path: &["server", "cpu_us_per_delivery"],
        checks: &[Check::Info],
        against: None,
    },
    Row {
        target: "6. Cost follows interest: 100 rooms × 10 members on one server, 9,900 more rooms busy on another",
        what: "Chatify gateway CPU for the same work: with the other rooms busy (Chatify column) / without (reference column)",
        key: "interest-bg",
        path: &["server", "cpu_us_per_delivery"],
        checks: &[Check::RatioAtMost(1.2)],
        against: Some((
            "interest-base",
            &["server", "cpu_us_per_delivery"],
            "chatify",
        )),
    },
    Row {
        target: "7. Large rooms: one room over two gateways, 10,000 members (Chatify column) and 1,000 (reference column)",
        what: "NATS bytes per join while the room fills (in + out, from /varz)",
        key: "bigroom-large",
        path: &["fill", "nats", "bytes_per_join"],
        checks: &[Check::RatioAtMost(1.5)],
        against: Some((
            "bigroom-small",
            &["fill", "nats", "bytes_per_join"],
            "chatify",
        )),
    },
    Row {
        target: "7. Large rooms: one room over two gateways, 10,000 members (Chatify column) and 1,000 (reference column)",
        what: "seconds to fill the room (every join acknowledged, 16 joins in flight)",
        key: "bigroom-large",
        path: &["fill", "seconds"],
        checks: &[Check::Info],
        against: Some(("bigroom-small", &["fill", "seconds"], "chatify")),
    },
    Row {
        target: "7. Large rooms: one room over two gateways, 10,000 members (Chatify column) and 1,000 (reference column)",
        what: "joins per second while filling",
        key: "bigroom-large",
        path: &["fill", "joins_per_s"],
        checks: &[Check::Info],
        against: Some(("bigroom-small", &["fill", "joins_per_s"], "chatify")),
    },
    Row {
        target: "7. Large rooms: one room over two gateways, 10,000 members (Chatify column) and 1,000 (reference column)",
        what: "deliveries lost, messages at 5/s into the full room",
        key: "bigroom-large",
        path: &["lost_deliveries"],
        checks: &[Check::AtMost(0.0)],
        against: Some(("bigroom-small", &["lost_deliveries"], "chatify")),
    },
    Row {
        target: "7. Large rooms: one room over two gateways, 10,000 members (Chatify column) and 1,000 (reference column)",
        what: "delivery p99 (ms)",
        key: "bigroom-large",
        path: &["delivery_latency", "p99_ms"],
        checks: &[Check::Info],
        against: Some(("bigroom-small", &["delivery_latency", "p99_ms"], "chatify")),
    },
    Row {
        target: "8. Reaction storm: 1,000 members of one room over two gateways react to one message within 1 s (Chatify column) against as many plain messages (reference column)",
        what: "seconds from the first react (send) to the last event received",
        key: "storm",
        path: &["reactions", "settle_s"],
        checks: &[Check::Info],
        against: Some(("storm", &["messages", "settle_s"], "chatify")),
    },
    Row {
        target: "8. Reaction storm: 1,000 members of one room over two gateways react to one message within 1 s (Chatify column) against as many plain messages (reference column)",
        what: "deliveries (events received by members; expected members²)",
        key: "storm",
        path: &["reactions", "events"],
        checks: &[Check::Info],
        against: Some(("storm", &["messages", "events"], "chatify")),
    },
    Row {
        target: "8. Reaction storm: 1,000 members of one room over two gateways react to one message within 1 s (Chatify column) against as many plain messages (reference column)",
        what: "events missing",
        key: "storm",
        path: &["reactions", "missing_events"],
        checks: &[Check::AtMost(0.0)],
        against: Some(("storm", &["messages", "missing_events"], "chatify")),
    },
    Row {
        target: "8. Reaction storm: 1,000 members of one room over two gateways react to one message within 1 s (Chatify column) against as many plain messages (reference column)",
        what: "requests refused",
        key: "storm",
        path: &["reactions", "refused"],
        checks: &[Check::AtMost(0.0)],
        against: Some(("storm", &["messages", "refused"], "chatify")),
    },
    Row {
        target: "8. Reaction storm: 1,000 members of one room over two gateways react to one message within 1 s (Chatify column) against as many plain messages (reference column)",
        what: "delivery p99 (ms), from when the react or send was due",
        key: "storm",
        path: &["reactions", "delivery_latency", "p99_ms"],
        checks: &[Check::Info],
        against: Some((
            "storm",
            &["messages", "delivery_latency", "p99_ms"],
            "chatify",
        )),
    },
    Row {
        target: "8. Reaction storm: 1,000 members of one room over two gateways react to one message within 1 s (Chatify column) against as many plain messages (reference column)",
        what: "CPU seconds, both gateways",
        key: "storm",
        path: &["reactions", "cpu_s", "gateway"],
        checks: &[Check::Info],
        against: Some(("storm", &["messages", "cpu_s", "gateway"], "chatify")),
    },
    Row {
        target: "8. Reaction storm: 1,000 members of one room over two gateways react to one message within 1 s (Chatify column) against as many plain messages (reference column)",
        what: "CPU seconds, NATS",
        key: "storm",
        path: &["reactions", "cpu_s", "nats"],
        checks: &[Check::Info],
        against: Some(("storm", &["messages", "cpu_s", "nats"], "chatify")),
    },
    Row {
        target: "8. Reaction storm: 1,000 members of one room over two gateways react to one message within 1 s (Chatify column) against as many plain messages (reference column)",
        what: "CPU seconds, persister",
        key: "storm",
        path: &["reactions", "cpu_s", "persister"],
        checks: &[Check::Info],
        against: Some(("storm", &["messages", "cpu_s", "persister"], "chatify")),
    },
    Row {
        target: "8. Reaction storm: 1,000 members of one room over two gateways react to one message within 1 s (Chatify column) against as many plain messages (reference column)",
        what: "CPU seconds, all four",
        key: "storm",
        path: &["reactions", "cpu_s", "total"],
        checks: &[Check::Info],
        against: Some(("storm", &["messages", "cpu_s", "total"], "chatify")),
    },
    Row {
        target: "8. Reaction storm: 1,000 members of one room over two gateways react to one message within 1 s (Chatify column) against as many plain messages (reference column)",
        what: "NATS bytes in + out (from /varz)",
        key: "storm",
        path: &["reactions", "nats", "bytes"],
        checks: &[Check::Info],
        against: Some(("storm", &["messages", "nats", "bytes"], "chatify")),
    },
    Row {
        target: "8. Reaction storm: 1,000 members of one room over two gateways react to one message within 1 s (Chatify column) against as many plain messages (reference column)",
        what: "NATS messages received (from /varz)",
        key: "storm",
        path: &["reactions", "nats", "in_msgs"],
        checks: &[Check::Info],
        against: Some(("storm", &["messages", "nats", "in_msgs"], "chatify")),
    },
    Row {
        target: "8. Reaction storm: 1,000 members of one room over two gateways react to one message within 1 s (Chatify column) against as many plain messages (reference column)",
        what: "members whose last reaction event did not hold the exact counts",
        key: "storm",
        path: &["exact", "members_not_exact"],
        checks: &[Check::AtMost(0.0)],
        against: None,
    },
    Row {
        target: "8. Reaction storm: 1,000 members of one room over two gateways react to one message within 1 s (Chatify column) against as many plain messages (reference column)",
        what: "seconds until get_history showed the exact counts (– : not persisted within the deadline)",
        key: "storm",
        path: &["history", "seconds"],
        checks: &[Check::Info],
        against: None,
    },
    Row {
        target: "9. One gateway and three on a 3-node NATS cluster: 100 rooms of 10, 400 messages/s; three gateways, each room spread over them (Chatify column) against one gateway (reference column)",
        what: "gateways' CPU per delivery (µs, all of them)",
        key: "scaleout-three",
        path: &["server", "cpu_us_per_delivery_by_component", "gateway"],
        checks: &[Check::Info],
        against: Some((
            "scaleout-one",
            &["server", "cpu_us_per_delivery_by_component", "gateway"],
            "chatify",
        )),
    },
    Row {
        target: "9. One gateway and three on a 3-node NATS cluster: 100 rooms of 10, 400 messages/s; three gateways, each room spread over them (Chatify column) against one gateway (reference column)",
        what: "NATS nodes' CPU per delivery (µs, all three)",
        key: "scaleout-three",
        path: &["server", "cpu_us_per_delivery_by_component", "nats"],
        checks: &[Check::Info],
        against: Some((
            "scaleout-one",
            &["server", "cpu_us_per_delivery_by_component", "nats"],
            "chatify",
        )),
    },
    Row {
        target: "9. One gateway and three on a 3-node NATS cluster: 100 rooms of 10, 400 messages/s; three gateways, each room spread over them (Chatify column) against one gateway (reference column)",
        what: "deliveries lost",
        key: "scaleout-three",
        path: &["lost_deliveries"],
        checks: &[Check::AtMost(0.0)],
        against: Some(("scaleout-one", &["lost_deliveries"], "chatify")),
    },
    Row {
        target: "9. One gateway and three on a 3-node NATS cluster: 100 rooms of 10, 400 messages/s; three gateways, each room spread over them (Chatify column) against one gateway (reference column)",
        what: "delivery p99 (ms)",
        key: "scaleout-three",
        path: &["delivery_latency", "p99_ms"],
        checks: &[Check::Info],
        against: Some(("scaleout-one", &["delivery_latency", "p99_ms"], "chatify")),
    },
];

fn lookup(v: &Value, path: &[&str]) -> Option<f64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_f64()
}

fn fmt(x: Option<f64>) -> String {
    match x {
        None => "–".into(),
        Some(v) if v.is_nan() => "–".into(),
        Some(v) if v.abs() >= 1000.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.3}"),
    }
}

/// Reads every summary of `dir`: (system, key) → summaries.
fn load(dir: &Path) -> anyhow::Result<BTreeMap<(String, String), Vec<Value>>> {
    let mut out: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(stem) = name.strip_suffix(".json") else {
            continue;
        };
        let mut parts = stem.splitn(2, '-');
        let (Some(system), Some(rest)) = (parts.next(), parts.next()) else {
            continue;
        };
        // The repeat number is the last dash-separated part.
        let Some((key, _rep)) = rest.rsplit_once('-') else {
            continue;
        };
        let text = std::fs::read_to_string(&path)?;
        let Some(v) = text
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
        else {
            continue;
        };
        out.entry((system.to_owned(), key.to_owned()))
            .or_default()
            .push(v);
    }
    Ok(out)
}

fn med(
    runs: &BTreeMap<(String, String), Vec<Value>>,
    system: &str,
    key: &str,
    path: &[&str],
) -> (Option<f64>, usize) {
    let vals: Vec<f64> = runs
        .get(&(system.to_owned(), key.to_owned()))
        .map(|v| v.iter().filter_map(|s| lookup(s, path)).collect())
        .unwrap_or_default();
    (median(&vals), vals.len())
}

/// The markdown table.
pub fn render(runs: &BTreeMap<(String, String), Vec<Value>>, header: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmark results\n");
    let _ = writeln!(md, "{header}\n");
    let _ = writeln!(
        md,
        "Medians of the repeated runs (n = runs per figure). Ratio = Chatify / reference, except where a row says what it compares with.\n"
    );
    let mut current = "";
    for row in ROWS {
        if row.target != current {
            current = row.target;
            let _ = writeln!(md, "\n## {current}\n");
            let _ = writeln!(
                md,
                "| figure | Chatify | reference | ratio | target | result |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|---|");
        }
        let (c, cn) = med(runs, "chatify", row.key, row.path);
        let (r, rn) = match row.against {
            Some((key, path, system)) => med(runs, system, key, path),
            None => med(runs, "reference", row.key, row.path),
        };
        let ratio = match (c, r) {
            (Some(c), Some(r)) if r != 0.0 => Some(c / r),
            _ => None,
        };
        let mut targets = Vec::new();
        let mut met = Vec::new();
        for check in row.checks {
            let (text, ok) = match *check {
                Check::AtMost(x) => (format!("≤ {}", fmt(Some(x))), c.map(|c| c <= x)),
                Check::AtLeast(x) => (format!("≥ {}", fmt(Some(x))), c.map(|c| c >= x)),
                Check::RatioAtMost(x) if x.is_infinite() => {
                    ("≥ 0.9 × direct".to_owned(), ratio.map(|q| q >= 0.9))
                }
                Check::RatioAtMost(x) => (format!("ratio ≤ {x}"), ratio.map(|q| q <= x)),
                Check::Below => ("< reference".to_owned(), c.zip(r).map(|(c, r)| c < r)),
                Check::NotAbove => ("≤ reference".to_owned(), c.zip(r).map(|(c, r)| c <= r)),
                Check::Info => ("–".to_owned(), None),
            };
            targets.push(text);
            if !matches!(check, Check::Info) {
                met.push(match ok {
                    Some(true) => "met",
                    Some(false) => "**missed**",
                    None => "not measured",
                });
            }
        }
        let _ = writeln!(
            md,
            "| {} | {} (n={cn}) | {} (n={rn}) | {} | {} | {} |",
            row.what,
            fmt(c),
            fmt(r),
            fmt(ratio),
            targets.join(", "),
            if met.is_empty() {
                "–".to_owned()
            } else {
                met.join(", ")
            }
        );
    }
    let _ = writeln!(md, "\n## Runs\n");
    let _ = writeln!(
        md,
        "| system | figure | runs | all ok | lost deliveries | load generator CPU % (max) | params |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for ((system, key), vals) in runs {
        let ok = vals
            .iter()
            .all(|v| v.get("ok").and_then(Value::as_bool) == Some(true));
        let lost: u64 = vals
            .iter()
            .filter_map(|v| v.get("lost_deliveries").and_then(Value::as_u64))
            .sum();
        let params = vals
            .first()
            .and_then(|v| v.get("params"))
            .map(|p| {
                let mut p = p.clone();
                if let Some(o) = p.as_object_mut() {
                    o.remove("run_id");
                }
                p.to_string()
            })
            .unwrap_or_default();
        let lg_cpu = vals
            .iter()
            .filter_map(|v| lookup(v, &["loadgen", "cpu_percent"]))
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
        let _ = writeln!(
            md,
            "| {system} | {key} | {} | {} | {lost} | {} | `{params}` |",
            vals.len(),
            if ok { "yes" } else { "**no**" },
            lg_cpu.map_or("–".to_owned(), |c| format!("{c:.0}"))
        );
    }
    md
}

pub fn write(dir: &Path, out: &Path, header: &str) -> anyhow::Result<()> {
    let runs = load(dir)?;
    std::fs::write(out, render(&runs, header))
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn medians_ratios_and_verdicts() {
        let mut runs = BTreeMap::new();
        let idle = |kib: f64| json!({"ok": true, "server": {"rss_kib_per_connection": kib}, "params": {"conns": 10}});
        runs.insert(
            ("chatify".into(), "idle".into()),
            vec![idle(5.0), idle(7.0), idle(100.0)],
        );
        runs.insert(
            ("reference".into(), "idle".into()),
            vec![idle(40.0), idle(50.0)],
        );
        let md = render(&runs, "header");
        // Medians 7 and 45: ratio 0.156, both idle targets met.
        assert!(
            md.contains("| gateway RSS per idle connection (KiB) | 7.000 (n=3) | 45.0 (n=2) | 0.156 | ≤ 8.000, ratio ≤ 0.5 | met, met |"),
            "{md}"
        );
        assert!(md.contains("| chatify | idle | 3 | yes | 0 | – |"), "{md}");
        assert!(md.contains("not measured"));
    }

    #[test]
    fn lookups() {
        let v = json!({"a": {"b": 2.5}});
        assert_eq!(lookup(&v, &["a", "b"]), Some(2.5));
        assert_eq!(lookup(&v, &["a", "c"]), None);
        assert_eq!(fmt(Some(f64::NAN)), "–");
        assert_eq!(fmt(Some(12345.6)), "12346");
    }
}
