"""What followers that do not read cost chatsvc (note 20): its RSS with ten of them on one 6 MB answer.

    .venv/bin/python bench/followers_memory.py                          # this checkout's chatsvc.py
    .venv/bin/python bench/followers_memory.py --chatsvc old/chatsvc.py --message fake:deltas=68000

One client reads the whole answer (the stream is then finished and kept for resuming); the RSS of
the service (VmRSS of its process) after that is the baseline. Ten clients then resume it from the
start (GET /chat/streams/{id}?after=-1) with a 4 KiB receive buffer and read nothing; for 10 s the
RSS is sampled every 50 ms. Prints the peak over the baseline, how many were cut off
(`follower_cut_off` lines) and how many of their connections the service still holds (what it
buffered for them waits to be read, unless the connection is aborted). The fake model of the tests
answers: `fake:huge=N` is one delta of N characters, `fake:deltas=N` N small ones.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fake_model import FakeModel
from tests.helpers import ROOT, Service

FOLLOWERS = 10
WATCH_S = 10.0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def held_connections(port: int) -> int:
    """The service's established TCP connections on its port (IPv4 loopback)."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for row in rows if row.split()[1].endswith(f":{port:04X}") and row.split()[3] == "01")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chatsvc", default=str(ROOT / "chatsvc.py"))
    parser.add_argument("--message", default="fake:huge=6000000")
    args = parser.parse_args()
    fake = FakeModel().start()
    env = {
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_API_KEY": "sk-bench-key-not-real-000000",
        "SEND_TIMEOUT_S": "1",
        "RESUME_GRACE_S": "0",
        "REQUEST_TIMEOUT_S": "60",
        "MAX_FOLLOWERS_PER_STREAM": str(FOLLOWERS),
    }
    service = Service(env, Path(tempfile.mkdtemp()), [sys.executable, str(Path(args.chatsvc).resolve())]).start()
    assert service.proc is not None
    sockets: list[socket.socket] = []
    try:
        with (
            httpx.Client(timeout=120) as client,
            client.stream("POST", f"{service.url}/chat", json={"message": args.message}) as response,
        ):
            stream_id = response.headers["x-stream-id"]
            size = len(response.read())
        baseline = rss_kib(service.proc.pid)
        for i in range(FOLLOWERS):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", service.port))
            head = f"GET /chat/streams/{stream_id}?after=-1 HTTP/1.1\r\nHost: x\r\nX-Request-ID: bench-{i}\r\n\r\n"
            sock.sendall(head.encode())
            sockets.append(sock)
        peak, started = baseline, time.monotonic()
        while time.monotonic() - started < WATCH_S:
            peak = max(peak, rss_kib(service.proc.pid))
            time.sleep(0.05)
        cut = sum(1 for record in service.logs() if record.get("event") == "follower_cut_off")
        print(
            f"answer {size / 1e6:.1f} MB; RSS after one reading client {baseline / 1024:.1f} MiB; "
            f"peak with {FOLLOWERS} non-reading followers over {WATCH_S:.0f} s {peak / 1024:.1f} MiB "
            f"(+{(peak - baseline) / 1024:.1f} MiB); cut off: {cut}; "
            f"connections still held: {held_connections(service.port)}"
        )
    finally:
        for sock in sockets:
            sock.close()
        service.stop()
        fake.stop()


if __name__ == "__main__":
    main()
