//! The gateway's client events in process: a gateway on its own nats-server, driven over
//! Socket.IO by a WebSocket client. History comes from a stand-in that answers every query with
//! an empty page (the persister and HarperDB are the end-to-end tests' business).

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Client, TestResult, spawn_app};

fn is_ok(ack: &Value) -> bool {
    ack["ok"] == json!(true)
}

fn code(ack: &Value) -> &str {
    ack["error"]["code"].as_str().unwrap_or_default()
}

fn from_chatbot(text: &str) -> impl Fn(&Value) -> bool + '_ {
    move |m| m["username"] == "ChatBot" && m["message"] == text && m.get("id").is_none()
}

async fn joined(client: &mut Client, room: &str, username: &str) -> Result<Value, support::Error> {
    let ack = client
        .ack("join_room", json!({"room": room, "username": username}))
        .await?;
    assert!(is_ok(&ack), "join {room} as {username}: {ack}");
    Ok(ack)
}

#[tokio::test]
async fn a_join_welcomes_tells_the_others_and_lists_everyone() -> TestResult {
    let app = spawn_app().await?;
    app.answer_history_with_nothing().await?;
    let mut ann = app.client().await?;
    let mut bob = app.client().await?;
    let ack = joined(&mut ann, "a.b *", "ann").await?;
    assert_eq!(ack["room"], "a.b *");
    assert_eq!(ack["history"], json!([]));
    assert_eq!(ack["users"].as_array().map(Vec::len), Some(1), "{ack}");
    ann.wait_for("receive_message", from_chatbot("Welcome ann"))
        .await?;
    ann.wait_for("last_100_messages", |h| *h == json!([]))
        .await?;

    // The original client's payload shape.
    let ack = bob
        .ack("join_room", json!({"userName": "bob", "userRoom": "a.b *"}))
        .await?;
    assert!(is_ok(&ack), "{ack}");
    let names = |users: &Value| -> Vec<String> {
        let mut names: Vec<String> = users
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|u| u["username"].as_str().map(str::to_owned))
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(&ack["users"]), ["ann", "bob"]);
    ann.wait_for(
        "receive_message",
        from_chatbot("bob has joined the chat room"),
    )
    .await?;
    ann.wait_for("chatroom_users", |u| names(u) == ["ann", "bob"])
        .await?;
    let notices = bob
        .received_within("receive_message", Duration::from_millis(200))
        .await;
    assert!(
        !notices
            .iter()
            .any(from_chatbot("bob has joined the chat room")),
        "the joiner was told of its own join: {notices:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_message_is_stored_then_delivered_to_every_member_in_send_order() -> TestResult {
    let app = spawn_app().await?;
    app.answer_history_with_nothing().await?;
    let (mut ann, mut bob, mut outsider) = (
        app.client().await?,
        app.client().await?,
        app.client().await?,
    );
    joined(&mut ann, "r", "ann").await?;
    joined(&mut bob, "r", "bob").await?;
    joined(&mut outsider, "elsewhere", "cy").await?;

    let ack = ann
        .ack("send_message", json!({"room": "r", "message": "  hello  "}))
        .await?;
    assert!(is_ok(&ack), "{ack}");
    let id = ack["id"].clone();
    assert!(ack["createdTime"].is_i64(), "{ack}");
    for member in [&mut ann, &mut bob] {
        let m = member
            .wait_for("receive_message", |m| m["id"] == id)
            .await?;
        assert_eq!(
            (&m["room"], &m["username"], &m["message"]),
            (&json!("r"), &json!("ann"), &json!("hello"))
        );
    }

    // A burst without waiting for acks keeps its order.
    let acks: Vec<_> = (0..30)
        .map(|i| {
            ann.emit_with_ack(
                "send_message",
                json!({"room": "r", "message": format!("m{i}")}),
            )
        })
        .collect::<Result<_, _>>()?;
    for ack in acks {
        let ack = tokio::time::timeout(support::WAIT, ack).await??;
        assert!(is_ok(&ack), "{ack}");
    }
    let mut texts = Vec::new();
    while texts.len() < 30 {
        let m = bob
            .wait_for("receive_message", |m| {
                m["message"].as_str().is_some_and(|t| t.starts_with('m')) && m.get("id").is_some()
            })
            .await?;
        texts.push(m["message"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(texts, (0..30).map(|i| format!("m{i}")).collect::<Vec<_>>());
    let leaked = outsider
        .received_within("receive_message", Duration::from_millis(200))
        .await;
    assert!(
        leaked.iter().all(|m| m["room"] == "elsewhere"),
        "another room's message leaked: {leaked:?}"
    );
    Ok(())
}

#[tokio::test]
async fn bad_events_are_refused_and_the_connection_stays() -> TestResult {
    let app = spawn_app().await?;
    app.answer_history_with_nothing().await?;
    let mut ann = app.client().await?;
    for (event, payload, expected) in [
        (
            "send_message",
            json!({"room": "r", "message": "x"}),
            "not_in_room",
        ),
        (
            "typing",
            json!({"room": "r", "isTyping": true}),
            "not_in_room",
        ),
        ("leave_room", json!({"room": "r"}), "not_in_room"),
        ("join_room", json!("r"), "invalid_payload"),
        (
            "join_room",
            json!({"room": "", "username": "ann"}),
            "invalid_payload",
        ),
        (
            "join_room",
            json!({"room": "r", "username": "a\u{0}b"}),
            "invalid_payload",
        ),
        (
            "get_history",
            json!({"room": "r", "limit": 101}),
            "invalid_payload",
        ),
        (
            "get_history",
            json!({"room": "r", "before": "not-an-id"}),
            "invalid_payload",
        ),
    ] {
        let ack = ann.ack(event, payload.clone()).await?;
        assert_eq!(code(&ack), expected, "{event} {payload}: {ack}");
    }
    joined(&mut ann, "r", "ann").await?;
    let ack = ann
        .ack(
            "send_message",
            json!({"room": "r", "message": "x".repeat(4097)}),
        )
        .await?;
    assert_eq!(code(&ack), "too_large", "{ack}");
    // Without a callback, a failure is an `error` event.
    ann.emit("send_message", json!({"room": "nowhere", "message": "x"}))?;
    let error = ann
        .wait_for("error", |e| e["code"] == "not_in_room")
        .await?;
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("nowhere")),
        "{error}"
    );
    // Still connected and in the room.
    let ack = ann
        .ack(
            "send_message",
            json!({"room": "r", "message": "still here"}),
        )
        .await?;
    assert!(is_ok(&ack), "{ack}");
    Ok(())
}

#[tokio::test]
async fn typing_reaches_the_others_and_a_leave_is_announced() -> TestResult {
    let app = spawn_app().await?;
    app.answer_history_with_nothing().await?;
    let (mut ann, mut bob) = (app.client().await?, app.client().await?);
    joined(&mut ann, "r", "ann").await?;
    joined(&mut bob, "r", "bob").await?;
    assert!(is_ok(
        &ann.ack("typing", json!({"room": "r", "isTyping": true}))
            .await?
    ));
    let typing = bob.wait_for("typing", |_| true).await?;
    assert_eq!(
        typing,
        json!({"room": "r", "username": "ann", "isTyping": true})
    );
    let own = ann
        .received_within("typing", Duration::from_millis(200))
        .await;
    assert!(own.is_empty(), "the typist got its own typing: {own:?}");

    assert!(is_ok(&ann.ack("leave_room", json!({"room": "r"})).await?));
    bob.wait_for(
        "receive_message",
        from_chatbot("ann has left the chat room"),
    )
    .await?;
    let ack = ann.ack("leave_room", json!({"room": "r"})).await?;
    assert_eq!(code(&ack), "not_in_room");
    let ack = ann
        .ack("send_message", json!({"room": "r", "message": "gone"}))
        .await?;
    assert_eq!(code(&ack), "not_in_room");
    Ok(())
}

#[tokio::test]
async fn a_join_without_history_is_undone() -> TestResult {
    // No stand-in: nobody answers history queries.
    let app = spawn_app().await?;
    let (mut ann, mut bob) = (app.client().await?, app.client().await?);
    let ack = ann
        .ack("join_room", json!({"room": "r", "username": "ann"}))
        .await?;
    assert_eq!(code(&ack), "unavailable", "{ack}");
    let ack = ann
        .ack("send_message", json!({"room": "r", "message": "x"}))
        .await?;
    assert_eq!(
        code(&ack),
        "not_in_room",
        "the failed join left the socket in the room"
    );
    // Nobody else heard of a member that never joined.
    app.answer_history_with_nothing().await?;
    let ack = joined(&mut bob, "r", "bob").await?;
    assert_eq!(ack["users"].as_array().map(Vec::len), Some(1), "{ack}");
    Ok(())
}
