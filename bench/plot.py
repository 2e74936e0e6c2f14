"""The benchmark as a picture: time added to the first delta (scenario A) and CPU per delta (B and C
in interleaved rounds), for each relay of one `bench/run.py --json` run, chatsvc beside the floor
of its stack and the obvious relay.

    .venv/bin/python bench/run.py --json bench/results.json
    .venv/bin/python bench/plot.py bench/results.json docs/benchmark.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: a file is the only output
import matplotlib.pyplot as plt  # after the backend is chosen

#: What each panel shows: the scenario's key in the run's figures, its title, and the factor from
#: the run's unit (seconds; CPU seconds per 10,000 deltas) to the one plotted.
PANELS = [
    ("A", "time added to the first delta, p50 (ms)", 1000.0),
    ("Bi", "CPU per delta, back to back (µs)", 100.0),
    ("Ci", "CPU per delta, a chunk every 20 ms (µs)", 100.0),
]
COLOURS = {"floor": "#8c8c8c", "obvious": "#d62728"}  # chatsvc and its variants: the default blue


def plot(run: dict[str, Any], out: Path) -> None:
    panels = [p for p in PANELS if run["figures"].get(p[0])]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.45 * len(run["relays"]) + 1.6))
    for ax, (key, title, scale) in zip([axes] if len(panels) == 1 else axes, panels, strict=True):
        relays = [r for r in run["relays"] if r in run["figures"][key]]
        values = [run["figures"][key][r] * scale for r in relays]
        ax.barh(relays, values, color=[COLOURS.get(r, "#1f77b4") for r in relays])
        ax.invert_yaxis()  # in the run's order, top down
        ax.set_title(title, fontsize=10)
        for y, value in enumerate(values):
            ax.annotate(f"{value:.1f}", (value, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        ax.margins(x=0.2)
    figure.suptitle(f"bench/run.py, {run['machine']}, {run['date']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", type=Path, help="what bench/run.py --json wrote")
    parser.add_argument("out", type=Path, help="the picture to write (.png or .svg)")
    args = parser.parse_args()
    plot(json.loads(args.results.read_text()), args.out)


if __name__ == "__main__":
    main()
