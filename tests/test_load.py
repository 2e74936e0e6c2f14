"""Under load: 1000 concurrent streams twice over, with nothing lost and nothing leaked; and SIGTERM
with 200 streams in flight. Bounded: every stream has loadgen.LIMIT_S, every wait its own limit.

The figures each run prints (pytest -s) are the ones quoted in the README's "Reliability".
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from tests import loadgen
from tests.helpers import Metrics, Service, StartService, scrape
from tests.test_faults import settle

pytestmark = pytest.mark.slow

STREAMS = 1000
DELTAS = 20
MESSAGE = f"fake:deltas={DELTAS},delay=0.05"
EXPECTED = "".join(f"w{i} " for i in range(DELTAS))


async def round_of(service: Service, streams: int) -> list[loadgen.Result]:
    return await asyncio.gather(*(loadgen.chat(service.port, {"message": MESSAGE}) for _ in range(streams)))


@pytest.mark.timeout(600)
def test_1000_concurrent_streams_twice_lose_nothing_and_leak_nothing(start_service: StartService) -> None:
    # RESUME_TTL_S=0: a finished log goes at once, so that both rounds end holding the same; with the
    # default, round 2 also held round 1's 1000 logs, and its growth was that and the allocator's noise.
    svc: Service = start_service(MAX_CONCURRENT_STREAMS="1100", LOG_LEVEL="WARNING", RESUME_TTL_S="0")
    svc.chat({"message": "warm-up"})
    before = scrape(svc)
    baseline = settle(svc, (before.value("process_open_fds"), before.value("chatsvc_event_loop_tasks")), limit=2)

    after: list[Metrics] = []
    for n in (1, 2):
        started = time.monotonic()
        results = asyncio.run(round_of(svc, STREAMS))
        took = time.monotonic() - started

        failed = [r for r in results if r.error or r.status != 200 or r.terminals != [r.events[-1]]]
        assert not failed, f"{len(failed)} streams failed, e.g. {failed[0]}"
        assert all(r.events[-1][0] == "done" and r.text == EXPECTED for r in results)
        assert settle(svc, baseline) == baseline, "descriptors or tasks left behind"
        after.append(scrape(svc))
        rss = after[-1].value("process_resident_memory_bytes") / 1e6
        print(f"\nround {n}: {STREAMS} streams x {DELTAS} deltas in {took:.1f} s, all intact; RSS {rss:.0f} MB")

    grew = after[1].value("process_resident_memory_bytes") - after[0].value("process_resident_memory_bytes")
    rss_before = before.value("process_resident_memory_bytes") / 1e6
    print(f"RSS before load {rss_before:.0f} MB; round 2 grew it by {grew / 1e6:.1f} MB")
    assert grew < 0.1 * after[0].value("process_resident_memory_bytes"), "memory kept growing: a leak"
    ok = [m.value("chatsvc_requests_total", code="ok") for m in (before, after[1])]
    assert ok[1] - ok[0] == 2 * STREAMS
    assert after[1].value("chatsvc_active_streams") == 0


@pytest.mark.timeout(300)
def test_sigterm_with_200_streams_in_flight(start_service: StartService) -> None:
    """100 short streams (done within the grace) and 100 stalled ones (outliving it): every one ends
    with exactly one terminal event, the short ones with done, and the process exits 0 in time."""
    grace = 3.0
    svc: Service = start_service(
        SHUTDOWN_GRACE_S=str(grace), IDLE_TIMEOUT_S="60", REQUEST_TIMEOUT_S="120", LOG_LEVEL="WARNING"
    )
    short_message, long_message = "fake:deltas=10,delay=0.1", "fake:deltas=5,stall_after=1"

    async def scenario() -> tuple[list[loadgen.Result], list[loadgen.Result], float]:
        started = 0
        all_started = asyncio.Event()

        def on_meta() -> None:
            nonlocal started
            started += 1
            if started == 200:
                all_started.set()

        short = [loadgen.chat(svc.port, {"message": short_message}, on_meta=on_meta) for _ in range(100)]
        long = [loadgen.chat(svc.port, {"message": long_message}, on_meta=on_meta) for _ in range(100)]
        tasks = [asyncio.ensure_future(c) for c in short + long]
        await asyncio.wait_for(all_started.wait(), 60)
        svc.signal(signal.SIGTERM)
        signalled = time.monotonic()
        results = await asyncio.gather(*tasks)
        return results[:100], results[100:], signalled

    short, long, signalled = asyncio.run(scenario())
    assert svc.proc is not None
    assert svc.proc.wait(timeout=grace + 10) == 0
    exited_after = time.monotonic() - signalled

    for result in short + long:
        assert result.error is None
        assert len(result.terminals) == 1
        assert result.events[-1] == result.terminals[0]
    assert all(r.events[-1][0] == "done" and r.text == "".join(f"w{i} " for i in range(10)) for r in short)
    assert all(r.events[-1][0] == "error" and r.events[-1][1]["code"] == "shutting_down" for r in long)
    print(f"\nSIGTERM with 200 streams: 100 done, 100 ended shutting_down, exit 0 after {exited_after:.1f} s")
    assert exited_after < grace + 5 + 2  # uvicorn's own limit is the grace + 5 s
