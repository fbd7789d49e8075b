"""A python-socketio client as an application would write it: connect with the default
WebSocket transport (which sends the target's own origin as Origin), join a room, send a message,
and print, as JSON lines, what it was answered and what it received."""

import json
import sys
import threading

import socketio


def main() -> int:
    url, room, username, text = sys.argv[1:5]
    received = threading.Event()
    sio = socketio.Client(reconnection=False)
    out = {"transport": None, "join": None, "send": None, "received": None}

    @sio.on("receive_message")
    def on_message(message):
        if message.get("message") == text:
            out["received"] = message
            received.set()

    sio.connect(url, transports=["websocket"], wait_timeout=5)
    out["transport"] = sio.transport()
    out["join"] = sio.call("join_room", {"username": username, "room": room}, timeout=5)
    out["send"] = sio.call("send_message", {"room": room, "message": text}, timeout=5)
    received.wait(timeout=5)
    sio.disconnect()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
