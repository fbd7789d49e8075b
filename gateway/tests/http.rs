//! Integration tests of the gateway's HTTP side against a real nats-server: routes, readiness,
//! the Origin check on Socket.IO requests, CORS, and history errors with no persister running.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{TestResult, spawn_app};

#[tokio::test]
async fn plain_routes_answer() -> TestResult {
    let app = spawn_app().await?;
    let root: Value = app.http.get(app.url("/")).send().await?.json().await?;
    assert_eq!(root, json!({"message": "Hello from chatify backend"}));
    assert_eq!(
        app.http.get(app.url("/healthz")).send().await?.status(),
        200
    );
    assert_eq!(app.http.get(app.url("/readyz")).send().await?.status(), 200);
    let metrics = app.http.get(app.url("/metrics")).send().await?;
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await?;
    assert!(text.contains("# HELP chatify_gateway_rooms "), "{text}");
    assert!(
        text.contains("# TYPE chatify_gateway_rooms gauge"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn readyz_follows_the_nats_connection() -> TestResult {
    let mut app = spawn_app().await?;
    app.nats.kill();
    let started = Instant::now();
    loop {
        let status = app.http.get(app.url("/readyz")).send().await?.status();
        if status == 503 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "readyz still {status} without NATS"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        app.http.get(app.url("/healthz")).send().await?.status(),
        200,
        "alive all the same"
    );
    Ok(())
}

#[tokio::test]
async fn foreign_origins_are_refused_on_polling_and_websocket() -> TestResult {
    let app = spawn_app().await?;
    let handshake = app.url("/socket.io/?EIO=4&transport=polling");
    let allowed = app
        .http
        .get(&handshake)
        .header("Origin", "http://localhost:3000")
        .send()
        .await?;
    assert_eq!(allowed.status(), 200);
    assert_eq!(
        allowed
            .headers()
            .get("access-control-allow-origin")
            .map(|v| v.as_bytes()),
        Some(&b"http://localhost:3000"[..])
    );
    assert!(
        allowed.text().await?.starts_with('0'),
        "an Engine.IO open packet"
    );

    let foreign = app
        .http
        .get(&handshake)
        .header("Origin", "https://evil.example")
        .send()
        .await?;
    assert_eq!(foreign.status(), 403);

    let upgrade = app
        .http
        .get(app.url("/socket.io/?EIO=4&transport=websocket"))
        .header("Origin", "https://evil.example")
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await?;
    assert_eq!(
        upgrade.status(),
        403,
        "cross-site WebSocket hijacking is refused"
    );

    let no_origin = app.http.get(&handshake).send().await?;
    assert_eq!(
        no_origin.status(),
        200,
        "non-browser clients send no Origin"
    );
    Ok(())
}

#[tokio::test]
async fn history_route_refuses_bad_input_and_reports_unavailable() -> TestResult {
    let app = spawn_app().await?;
    for bad in ["limit=0", "limit=101", "limit=abc", "before=not-an-id"] {
        let r = app
            .http
            .get(app.url(&format!("/api/rooms/general/messages?{bad}")))
            .send()
            .await?;
        assert_eq!(r.status(), 400, "{bad}");
        let body: Value = r.json().await?;
        assert_eq!(body["ok"], json!(false));
        assert_eq!(body["error"]["code"], json!("invalid_payload"), "{bad}");
    }
    // No persister runs: history is unavailable, quickly and clearly.
    let started = Instant::now();
    let r = app
        .http
        .get(app.url("/api/rooms/a%2Eb%20%2A/messages?limit=5"))
        .send()
        .await?;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await?;
    assert_eq!(body["error"]["code"], json!("unavailable"));
    assert!(started.elapsed() < Duration::from_secs(3));
    Ok(())
}

#[tokio::test]
async fn a_body_that_stops_coming_is_cut_off_and_counted() -> TestResult {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = support::spawn_app_with(|s| s.gateway.body_read_timeout_ms = 300).await?;
    let counted = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("chatify_gateway_http_timeouts_total{phase=\"body\"}"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let before = counted(
        &app.http
            .get(app.url("/metrics"))
            .send()
            .await?
            .text()
            .await?,
    );
    let open = app
        .http
        .get(app.url("/socket.io/?EIO=4&transport=polling"))
        .send()
        .await?
        .text()
        .await?;
    let sid = serde_json::from_str::<Value>(open.trim_start_matches('0'))?["sid"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mut stream = tokio::net::TcpStream::connect(app.addr).await?;
    let head = format!(
        "POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n0123456789"
    );
    stream.write_all(head.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    let after = counted(
        &app.http
            .get(app.url("/metrics"))
            .send()
            .await?
            .text()
            .await?,
    );
    assert!(
        after > before,
        "the cut-off body was not counted ({before} -> {after})"
    );
    Ok(())
}
