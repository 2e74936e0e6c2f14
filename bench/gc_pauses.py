"""What a burst of streams leaves to CPython's cycle collector in chatsvc (note 10): the collections
during the burst (generation, pause, objects collected), and the unreachable objects a full
collection finds after it, by type.

    .venv/bin/python bench/gc_pauses.py                        # 200 streams, half of them failing
    .venv/bin/python bench/gc_pauses.py --streams 1000 --concurrency 100

chatsvc runs as `python chatsvc.py` does, under a `python -c` wrapper (WRAPPER) that, with
CHATSVC_GC_DEBUG=1, adds a `gc.callbacks` hook and, on SIGUSR1, runs `gc.collect()` with
DEBUG_SAVEALL and appends what it found to CHATSVC_GC_REPORT; from the first report on, DEBUG_SAVEALL
stays on, so that the second one names every object that any collection found in cycles during the
burst (chatsvc's idle collections included, note 10). chatsvc.py itself knows nothing of it. A
warm-up burst and a first report come first, so that what start-up left is not counted. A finished
stream should leave nothing: its objects go with their last reference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fake_model import FakeModel
from tests.helpers import ROOT, Service

WRAPPER = r"""
import collections, gc, json, os, runpy, signal, sys, time

if os.environ.get("CHATSVC_GC_DEBUG") == "1":
    pauses, began = [], [0.0]

    def on_gc(phase, info):
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            pauses.append([info["generation"], round((time.perf_counter() - began[0]) * 1000, 3), info["collected"]])

    def report(sig, frame):
        during = pauses[:]
        gc.set_debug(gc.DEBUG_SAVEALL)
        found = gc.collect()
        kinds = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
        ours = collections.Counter(k for k in kinds.elements() if k.startswith("__main__."))
        gc.garbage.clear()  # DEBUG_SAVEALL stays on: the next report has every cycle found until then
        pauses.clear()
        line = {"unreachable": found, "kinds": kinds.most_common(20), "ours": ours.most_common(), "pauses": during}
        with open(os.environ["CHATSVC_GC_REPORT"], "a") as out:
            out.write(json.dumps(line) + "\n")

    gc.callbacks.append(on_gc)
    signal.signal(signal.SIGUSR1, report)

sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as `python chatsvc.py` sets it
runpy.run_path(sys.argv[0], run_name="__main__")
"""

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


def active_streams(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("chatsvc_active_streams "):
            return float(line.split()[1])
    raise RuntimeError("no chatsvc_active_streams")


def report(service: Service, path: Path) -> dict[str, Any]:
    """Ask the wrapper for a full collection and wait for its line (a child's file: polled)."""
    before = len(path.read_text().splitlines()) if path.exists() else 0
    while active_streams(service.url) != 0:  # every producer has ended and released its slot
        time.sleep(0.05)
    service.signal(signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while not path.exists() or len(path.read_text().splitlines()) == before:
        assert time.monotonic() < deadline, "no gc report"
        time.sleep(0.05)
    result: dict[str, Any] = json.loads(path.read_text().splitlines()[-1])
    return result


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
        "CHATSVC_GC_DEBUG": "1",
        "CHATSVC_GC_REPORT": str(report_path),
    }
    wrapper = WRAPPER.replace("{", "{{").replace("}", "}}")  # Service formats "{port}" into the command
    command = [sys.executable, "-c", wrapper, str(Path(args.chatsvc).resolve())]
    service = Service(env, workdir, command).start()
    try:
        asyncio.run(burst(service.url, 20, 10, messages))  # warm-up: imports, pools, first-use caches
        report(service, report_path)
        started = time.monotonic()
        done = asyncio.run(burst(service.url, args.streams, args.concurrency, messages))
        elapsed = time.monotonic() - started
        after = report(service, report_path)
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
        print(f"of them chatsvc's own (module __main__): {sum(c for _, c in after['ours'])}")
        for kind, count in after["ours"]:
            print(f"  {count:6d} {kind}")
    finally:
        service.stop()
        fake.stop()


if __name__ == "__main__":
    main()
