"""Time to first token and tokens per second through chatsvc, as a client sees them.

    make run                                   # in one terminal (the embedded model when no key)
    .venv/bin/python bench/embedded_model.py   # in another; --url and -n to change

Each request asks the same question at temperature 0. Time to first token is from sending the
request to the first `delta` event; tokens per second is deltas after the first divided by the time
from the first delta to the last. Prints every request, then the medians. Bounded: -n requests,
each with a 120 s timeout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx

QUESTION = "Explain in a few sentences why the sky is blue."


def one(client: httpx.Client, url: str, max_tokens: int) -> tuple[float, float, int]:
    body = {"message": QUESTION, "max_tokens": max_tokens, "temperature": 0}
    sent = time.perf_counter()
    stamps: list[float] = []
    event = None
    with client.stream("POST", f"{url}/chat", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: ") and event == "delta":
                stamps.append(time.perf_counter())
            elif line.startswith("data: ") and event == "error":
                raise RuntimeError(json.loads(line[len("data: ") :]))
    if len(stamps) < 2:
        raise RuntimeError("fewer than two deltas")
    ttft_ms = (stamps[0] - sent) * 1000
    tokens_per_s = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return ttft_ms, tokens_per_s, len(stamps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("-n", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=100)
    args = parser.parse_args()

    ttfts, rates = [], []
    with httpx.Client(timeout=120) as client:
        for i in range(args.n):
            ttft_ms, tokens_per_s, count = one(client, args.url, args.max_tokens)
            ttfts.append(ttft_ms)
            rates.append(tokens_per_s)
            print(f"request {i + 1:2d}: ttft {ttft_ms:7.1f} ms  {tokens_per_s:6.1f} tokens/s  ({count} deltas)")
    print(f"median of {args.n}: ttft {statistics.median(ttfts):.1f} ms, {statistics.median(rates):.1f} tokens/s")


if __name__ == "__main__":
    main()
