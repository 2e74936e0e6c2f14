"""What the two chat protocols cost apart from the relay they share (note 12): the per-delta
encoders, the meta and terminal events, and the request parsing, timed in-process (best of
several repeats). Everything else a stream does, the producer, the log and the followers, is the
same code for both; bench/run.py measures the whole path (relays `chatsvc` and `ai-sdk`).

    .venv/bin/python bench/protocols.py           # about ten seconds
    .venv/bin/python bench/protocols.py --smoke   # a quick run, to see that it works
"""

from __future__ import annotations

import argparse
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import chatsvc  # the module this measures, from the project's root

STREAM_ID = "0123456789abcdef0123456789abcdef"
CORRELATION_ID = "5f0c3a52-6a4e-4a39-9d1e-2b7f0f6c9e11"
META = {"correlation_id": CORRELATION_ID, "model": "gpt-4o-mini", "stream_id": STREAM_ID}
USAGE = {"prompt_tokens": 12, "completion_tokens": 500, "total_tokens": 512, "source": "upstream"}
DONE = {
    "finish_reason": "stop",
    "usage": USAGE,
    "ttft_ms": 41.2,
    "duration_ms": 2210.5,
    "correlation_id": CORRELATION_ID,
}
CHAT = (
    b'{"message": "Tell me about the sea.", "history": ['
    b'{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
)
UI_CHAT = (
    b'{"id": "k3JxQ2mZ8pLw0aB1", "trigger": "submit-message", "messages": ['
    b'{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]},'
    b'{"id": "a1", "role": "assistant", "parts": [{"type": "text", "text": "hello", "state": "done"}]},'
    b'{"id": "u2", "role": "user", "parts": [{"type": "text", "text": "Tell me about the sea."}]}]}'
)


def best(work: Callable[[], object], number: int) -> float:
    """Seconds one call takes, at best of five repeats."""
    return min(timeit.repeat(work, number=number, repeat=5)) / number


def measure(protocol: chatsvc.ChatProtocol, body: bytes, settings: chatsvc.Settings, number: int) -> str:
    deltas = [f"t{i} " for i in range(8)]  # what one read of a fast model holds
    delta = best(lambda: protocol.deltas(STREAM_ID, 5, deltas), number) / len(deltas)
    ends = best(
        lambda: (protocol.event(STREAM_ID, 0, "meta", META), protocol.event(STREAM_ID, 9, "done", DONE)), number
    )
    parse = best(lambda: protocol.parse(body, settings), number)
    return f"| {protocol.path} | {delta * 1e9:.0f} ns | {ends * 1e6:.1f} µs | {parse * 1e6:.1f} µs |"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    number = 200 if parser.parse_args().smoke else 20_000
    settings = chatsvc.Settings(_env_file=None)
    rows = [
        measure(chatsvc.CHATSVC, CHAT, settings, number),
        measure(chatsvc.AI_SDK, UI_CHAT, settings, number),
    ]
    print("| protocol | encode a delta | meta and done events | parse a request (three turns) |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
