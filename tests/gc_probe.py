"""What chatsvc leaves to CPython's cycle collector, seen from inside a real `python chatsvc.py`.

`command(chatsvc)` runs chatsvc as `python chatsvc.py` does, under a `python -c` wrapper that, with
CHATSVC_GC_DEBUG=1, times every collection (a `gc.callbacks` hook) and, on SIGUSR1 and once more at
exit, runs a full collection with DEBUG_SAVEALL and appends to CHATSVC_GC_REPORT what it found:
every unreachable object, by type, and those of chatsvc's own modules. From the first report on,
DEBUG_SAVEALL stays on, so that the next report names every object that any collection found
unreachable since (chatsvc's idle collections included, note 10). chatsvc.py knows nothing of it.
Used by tests/test_garbage.py and bench/gc_pauses.py.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tests.helpers import Service, scrape

#: chatsvc's own modules; run as `python chatsvc.py`, the app's is `__main__`.
OURS = (
    "__main__", "chatsvc", "redis_store", "metrics", "http_protocol", "logging_conf", "ai_sdk", "tracing",
    "served_files", "worker_metrics",
)  # fmt: skip

WRAPPER = r"""
import atexit, collections, gc, json, os, runpy, signal, sys, time

OURS = set(OURS_HERE)

if os.environ.get("CHATSVC_GC_DEBUG") == "1":
    pauses, began = [], [0.0]

    def on_gc(phase, info):
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            pauses.append([info["generation"], round((time.perf_counter() - began[0]) * 1000, 3), info["collected"]])

    def report(sig=None, frame=None):
        during = pauses[:]
        gc.set_debug(gc.DEBUG_SAVEALL)
        found = gc.collect()
        name = lambda o: f"{type(o).__module__}.{type(o).__qualname__}"
        kinds = collections.Counter(name(o) for o in gc.garbage)
        ours = collections.Counter(name(o) for o in gc.garbage if type(o).__module__ in OURS)
        why = {kind: referrers(next(o for o in gc.garbage if name(o) == kind)) for kind in ours}
        # Every object of ours still alive, the unreachable ones that DEBUG_SAVEALL keeps included: an
        # object that a cycle held while something else still did is found here, not above.
        alive = collections.Counter(name(o) for o in gc.get_objects() if type(o).__module__ in OURS)
        watched = set(os.environ.get("CHATSVC_GC_WATCH", "").split(","))
        for kind in alive:
            if kind.rsplit(".", 1)[-1] in watched and kind not in why:
                why[kind] = referrers(next(o for o in gc.get_objects() if name(o) == kind), among=None)
        gc.garbage.clear()  # DEBUG_SAVEALL stays on: the next report has every cycle found until then
        pauses.clear()
        line = {"unreachable": found, "kinds": kinds.most_common(20), "ours": dict(ours), "alive": dict(alive),
                "why": why, "pauses": during}
        with open(os.environ["CHATSVC_GC_REPORT"], "a") as out:
            out.write(json.dumps(line) + "\n")

    def describe(o):
        if type(o).__name__ == "frame":
            return f"frame {o.f_code.co_name} ({os.path.basename(o.f_code.co_filename)}:{o.f_lineno})"
        if type(o).__name__ in ("function", "method"):
            return f"{type(o).__name__} {getattr(o, '__qualname__', '?')}"
        return f"{type(o).__module__}.{type(o).__qualname__}"

    def referrers(target, depth=8, width=4, among=True):
        # What holds `target` (among the unreachable objects, or among all), breadth first: where a
        # cycle, or a leak, comes from.
        unreachable = {id(o) for o in gc.garbage} if among else None
        lines, level, seen = [], [target], {id(target), id(sys._getframe())}
        for step in range(depth):
            following = []
            for o in level:
                for r in gc.get_referrers(o):
                    if (unreachable is None or id(r) in unreachable) and id(r) not in seen:
                        seen.add(id(r))
                        following.append(r)
                        lines.append("  " * step + describe(r) + " -> " + describe(o))
            level = following[:width]
        return lines[:60]

    gc.callbacks.append(on_gc)
    signal.signal(signal.SIGUSR1, report)
    atexit.register(report)

sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as `python chatsvc.py` sets it
runpy.run_path(sys.argv[0], run_name="__main__")
""".replace("OURS_HERE", repr(OURS))


def command(chatsvc: Path) -> list[str]:
    """`python chatsvc.py` under the wrapper (Service formats "{port}" into a command: braces doubled)."""
    return [sys.executable, "-c", WRAPPER.replace("{", "{{").replace("}", "}}"), str(chatsvc.resolve())]


def env(report: Path, watch: tuple[str, ...] = ()) -> dict[str, str]:
    """The wrapper's settings: where it reports, and the classes of ours whose live instances it
    explains (what holds them)."""
    return {"CHATSVC_GC_DEBUG": "1", "CHATSVC_GC_REPORT": str(report), "CHATSVC_GC_WATCH": ",".join(watch)}


def reports(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def report(service: Service, path: Path) -> dict[str, Any]:
    """Once no stream is in flight, ask the wrapper for a full collection, and wait for its line (a
    child's file: polled, as no event crosses the processes)."""
    before = len(reports(path))
    deadline = time.monotonic() + 30
    while scrape(service).value("chatsvc_active_streams"):  # every producer has ended and released its slot
        assert time.monotonic() < deadline, "streams still in flight"
        time.sleep(0.05)
    service.signal(signal.SIGUSR1)
    while len(reports(path)) == before:
        assert time.monotonic() < deadline, "no gc report"
        time.sleep(0.05)
    return reports(path)[-1]
