"""What N followers that never read leave behind once SEND_TIMEOUT_S has cut them off (note 17):
the service's sockets to them and the bytes the kernel still holds to send, from /proc/net/tcp, and
the kernel's TCP memory (/proc/net/sockstat, in pages: the whole machine's, so other work moves
it). Each asks for an answer of --chars characters in one delta, with a 4 KiB receive buffer, and
reads nothing. 3 MB is over what the kernel takes for one socket here (some 2.8 MB), so the send
blocks and SEND_TIMEOUT_S cuts the follower off; a smaller answer fits in the kernel whole and is
left to it (the keep-alive timeout closes the connection; the kernel's orphan limits bound the rest).

    .venv/bin/python bench/slow_followers.py [-n 50] [--chars 3000000] [--chatsvc DIR]

DIR holds the chatsvc.py to run (default: this checkout), so that another version can be compared.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fake_model import FakeModel
from tests.helpers import ROOT, Service


def server_sockets(port: int) -> tuple[int, int]:
    """The service's connected sockets on `port`, and the bytes queued to send on them."""
    count = queued = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] != "0A":  # 0A: listening
            count += 1
            queued += int(fields[4].split(":")[0], 16)
    return count, queued


def tcp_memory_pages() -> int:
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1])
    raise RuntimeError("no TCP line in /proc/net/sockstat")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=50)
    parser.add_argument("--chars", type=int, default=3_000_000)
    parser.add_argument("--chatsvc", type=Path, default=ROOT)
    args = parser.parse_args()
    body = json.dumps({"message": f"fake:huge={args.chars}"}).encode()

    fake = FakeModel().start()
    env = {
        "OPENAI_BASE_URL": fake.base_url,
        "SEND_TIMEOUT_S": "1",
        "RESUME_GRACE_S": "0",
        "RESUME_BUFFER_MB": "1024",
        "RESUME_TTL_S": "0",
        "REQUEST_TIMEOUT_S": "120",
    }
    command = [sys.executable, str(args.chatsvc.resolve() / "chatsvc.py")]
    service = Service(env, Path(tempfile.mkdtemp(prefix="slow-followers-")), command).start()
    followers: list[socket.socket] = []
    try:
        before = tcp_memory_pages()
        for i in range(args.n):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", service.port))
            sock.sendall(
                b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"X-Request-ID: slow-{i}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            followers.append(sock)
        for i in range(args.n):  # the answer read whole from the model, or the stream cut off
            ended = {"request_completed", "request_failed"}
            deadline = time.monotonic() + 60
            while not any(r["event"] in ended for r in service.logs_for(f"slow-{i}")):
                assert time.monotonic() < deadline, f"slow-{i} did not end"
                time.sleep(0.05)
        time.sleep(3)  # SEND_TIMEOUT_S for the last follower, then closes settle: nothing to await
        count, queued = server_sockets(service.port)
        after = tcp_memory_pages()
        print(
            f"{args.n} followers cut off: {count} service sockets left, {queued / 1e6:.1f} MB queued to send; "
            f"kernel TCP memory {before} -> {after} pages ({(after - before) * 4096 / 1e6:+.1f} MB)"
        )
    finally:
        for sock in followers:
            sock.close()
        service.stop()
        fake.stop()


if __name__ == "__main__":
    main()
