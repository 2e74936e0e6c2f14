"""How long slow senders hold connections to `python chatsvc.py` with the default deadlines (note
17): 20 sockets sending a header byte every 10 s, 20 sending 262,000 of 262,144 declared body
bytes, 10 sending nothing. Prints how many of each are still open every 5 s, for --seconds.

    .venv/bin/python bench/slowloris.py [--seconds 40] [--chatsvc DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import select
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fake_model import FakeModel
from tests.helpers import ROOT, Service

DECLARED = 262_144
SENT = 262_000


def still_open(sock: socket.socket) -> bool:
    """Whether the service has neither closed nor reset it (an answer, such as a 408, is read and dropped)."""
    while select.select([sock], [], [], 0)[0]:
        try:
            if not sock.recv(65536):
                return False
        except OSError:
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--chatsvc", type=Path, default=ROOT)
    args = parser.parse_args()

    fake = FakeModel().start()
    command = [sys.executable, str(args.chatsvc.resolve() / "chatsvc.py")]
    service = Service({"OPENAI_BASE_URL": fake.base_url}, Path(tempfile.mkdtemp(prefix="slowloris-")), command).start()
    groups: dict[str, list[socket.socket]] = {"header bytes": [], "body short": [], "nothing": []}
    try:
        for name, sockets in groups.items():
            for _ in range(10 if name == "nothing" else 20):
                sock = socket.create_connection(("127.0.0.1", service.port))
                if name == "body short":
                    sock.sendall(
                        b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        + f"Content-Length: {DECLARED}\r\n\r\n".encode()
                        + b"x" * SENT
                    )
                elif name == "header bytes":
                    sock.sendall(b"GET /healthz HTTP/1.1\r\n")
                sockets.append(sock)
        started = time.monotonic()
        next_byte = started
        while (elapsed := time.monotonic() - started) < args.seconds:
            if time.monotonic() >= next_byte:
                for sock in groups["header bytes"]:
                    with contextlib.suppress(OSError):  # closed by the service already
                        sock.sendall(b"X")
                next_byte += 10
            counts = {name: sum(still_open(s) for s in sockets) for name, sockets in groups.items()}
            print(f"{elapsed:4.0f} s: " + ", ".join(f"{name} {n} open" for name, n in counts.items()), flush=True)
            time.sleep(5)
    finally:
        for sockets in groups.values():
            for sock in sockets:
                sock.close()
        service.stop()
        fake.stop()


if __name__ == "__main__":
    main()
