"""What a burst of streams leaves to CPython's cycle collector in chatsvc (note 10): the collections
during the burst (generation, pause, objects collected), and the unreachable objects a full
collection finds after it, by type.

    .venv/bin/python bench/gc_pauses.py                        # 200 streams, half of them failing
    .venv/bin/python bench/gc_pauses.py --streams 1000 --concurrency 100

chatsvc runs as `python chatsvc.py` does, under tests/gc_probe.py's wrapper, which reports every
unreachable object that a collection finds; chatsvc.py itself knows nothing of it. A warm-up burst
and a first report come first, so that what start-up left is not counted. A finished stream should
leave nothing of chatsvc's but its response, which anyio keeps in a cycle (tests/test_garbage.py
says why, and proves the rest).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import gc_probe
from tests.fake_model import FakeModel
from tests.helpers import ROOT, Service

#: Answers of every kind: whole ones, and ones the model server breaks (each failure an exception).
MESSAGES = [
    "fake:deltas=20",
    "fake:deltas=20,usage=0",
    "fake:deltas=10,die_after=5",
    "fake:deltas=10,error_after=5",
    "fake:deltas=10,garbage_after=5",
    "fake:deltas=10,no_finish=1",
]


async def burst(url: str, streams: int, concurrency: int, messages: list[str]) -> int:
    """`streams` chats, `concurrency` at a time, each read to its end. Returns how many ended with `done`."""
    limit = asyncio.Semaphore(concurrency)
    done = 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal done
        async with limit, client.stream("POST", f"{url}/chat", json={"message": messages[i % len(messages)]}) as r:
            body = await r.aread()
            done += b"event: done" in body

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(one(client, i) for i in range(streams)))
    return done


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chatsvc", default=str(ROOT / "chatsvc.py"))
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--ok-only", action="store_true", help="only whole answers, no failures")
    args = parser.parse_args()
    messages = MESSAGES[:2] if args.ok_only else MESSAGES
    workdir = Path(tempfile.mkdtemp())
    report_path = workdir / "gc-report.jsonl"
    fake = FakeModel().start()
    env = {
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_API_KEY": "sk-bench-key-not-real-000000",
        "UPSTREAM_MAX_RETRIES": "0",
        "MAX_CONCURRENT_STREAMS": str(max(args.concurrency, 10)),
        "LOG_LEVEL": "WARNING",
        **gc_probe.env(report_path),
    }
    service = Service(env, workdir, gc_probe.command(Path(args.chatsvc))).start()
    try:
        asyncio.run(burst(service.url, 20, 10, messages))  # warm-up: imports, pools, first-use caches
        gc_probe.report(service, report_path)
        started = time.monotonic()
        done = asyncio.run(burst(service.url, args.streams, args.concurrency, messages))
        elapsed = time.monotonic() - started
        after = gc_probe.report(service, report_path)
        pauses = after["pauses"]
        by_generation: dict[int, list[float]] = {}
        for generation, ms, _ in pauses:
            by_generation.setdefault(generation, []).append(ms)
        print(f"{args.streams} streams ({done} done, the rest failed as scripted) in {elapsed:.1f} s")
        for generation, times in sorted(by_generation.items()):
            print(
                f"  generation {generation}: {len(times)} collections, "
                f"max {max(times):.2f} ms, total {sum(times):.2f} ms"
            )
        found = sum(c for _, _, c in pauses) + after["unreachable"]
        print(f"in cycles, found by the collections during the burst and a full one after it: {found} objects")
        for kind, count in after["kinds"]:
            print(f"  {count:6d} {kind}")
        print(f"of them chatsvc's own: {sum(after['ours'].values())}")
        for kind, count in after["ours"].items():
            print(f"  {count:6d} {kind}")
    finally:
        service.stop()
        fake.stop()


if __name__ == "__main__":
    main()
