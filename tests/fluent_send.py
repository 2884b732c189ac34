"""Send events to a Forward input with Python's real fluent-logger (PyPI `fluent-logger`).

Usage: fluent_send.py HOST PORT TAG COUNT plain|ack

plain: FluentSender.emit / emit_with_time, half the events with nanosecond precision
       (EventTime), exactly as applications use the library.
ack:   fluent-logger-python has no require_ack_response option (the Ruby and Java loggers
       do), so this subclass adds the protocol's `chunk` option to each packet the library
       builds and, after the library sent it, waits for `{"ack": chunk}` on the library's
       own socket before sending the next one.

Prints one line "sent N" (plain) or "acked N" (ack); exits non-zero on any failure.
"""

import base64
import os
import sys

import msgpack
from fluent import sender


def event(i, mode):
    return {
        "i": i,
        "mode": mode,
        "msg": "hello from python",
        "unicode": "h\u00e9llo \u2603",
        "nested": {"list": [1, 2.5, None, True], "n": {"deep": "x"}},
    }


class AckSender(sender.FluentSender):
    """FluentSender that asks for and checks the protocol's ack per packet."""

    def _make_packet(self, label, timestamp, data):
        tag = f"{self.tag}.{label}" if label else self.tag
        self.chunk = base64.b64encode(os.urandom(16)).decode()
        return msgpack.packb((tag, timestamp, data, {"chunk": self.chunk}))

    def _check_recv_side(self):
        # the library's check would read (and drop) our ack: we read it ourselves
        pass

    def wait_ack(self, timeout):
        self.socket.settimeout(timeout)
        unpacker = msgpack.Unpacker(raw=False)
        while True:
            data = self.socket.recv(4096)
            if not data:
                raise RuntimeError("connection closed before the ack")
            unpacker.feed(data)
            for obj in unpacker:
                if obj != {"ack": self.chunk}:
                    raise RuntimeError(f"unexpected answer {obj!r}, wanted ack {self.chunk}")
                return


def main():
    host, port, tag, count, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
    if mode == "plain":
        plain = sender.FluentSender(tag, host=host, port=port)
        nano = sender.FluentSender(tag, host=host, port=port, nanosecond_precision=True)
        for i in range(count):
            s = nano if i % 2 else plain
            if not s.emit("app", event(i, mode)):
                raise RuntimeError(f"emit failed: {s.last_error}")
        plain.close()
        nano.close()
        print(f"sent {count}")
    elif mode == "ack":
        s = AckSender(tag, host=host, port=port, timeout=30.0)
        for i in range(count):
            if not s.emit_with_time("app", 1700000000 + i, event(i, mode)):
                raise RuntimeError(f"emit failed: {s.last_error}")
            s.wait_ack(30.0)
        s.close()
        print(f"acked {count}")
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
