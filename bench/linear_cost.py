"""What hostile input costs the event loop, at growing sizes: the log redaction of a text of near
misses, and the upstream frame splitter fed one large event in 4 KiB reads. Each should grow in
proportion to the size (chatsvc note 16, logging_conf note 4).

    .venv/bin/python bench/linear_cost.py
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from chatsvc import UpstreamFrames
from logging_conf import Redactor

KIB = 1024
T = TypeVar("T")
REDACTION_INPUTS: dict[str, Callable[[int], str]] = {
    "a...a@": lambda n: "/" + "a" * (n - 2) + "@",
    "a@a@...": lambda n: "a@" * (n // 2),
    "@a.a.a...": lambda n: "@" + "a." * (n // 2),
    "sk-sk-...": lambda n: "sk-" * (n // 3),
    "Authorization: aaa...,": lambda n: "Authorization: " + "a" * n + ",",
}


def seconds(run: Callable[[T], object], argument: T) -> float:
    started = time.perf_counter()
    run(argument)
    return time.perf_counter() - started


def split_event(size: int) -> None:
    body = b"data: " + b"y" * size + b"\n\n"
    frames = UpstreamFrames()
    for start in range(0, len(body), 4 * KIB):
        frames.feed(body[start : start + 4 * KIB])


def main() -> None:
    redactor = Redactor()
    for name, make in REDACTION_INPUTS.items():
        row = [f"{seconds(redactor.text, make(size * KIB)) * 1000:7.2f}" for size in (8, 16, 32, 64)]
        print(f"redaction ms at 8/16/32/64 KiB  {name:<24}" + " ".join(row))
    row = [f"{seconds(split_event, size * KIB * KIB):6.3f}" for size in (2, 4, 8, 15)]
    print("frames s at 2/4/8/15 MiB, 4 KiB reads " + " ".join(row))


if __name__ == "__main__":
    main()
