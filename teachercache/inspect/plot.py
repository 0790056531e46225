"""`teachercache plot`: the distributions of `teachercache inspect` as PNG figures.

Figures (one PNG each, matplotlib's Agg backend, no display needed), all drawn from the streaming
histograms of inspect_cache(), so plotting a large cache needs no more memory than inspecting it:

- captured_mass.png — positions by the probability mass of the stored set (1 - rest mass);
- entropy.png — positions by teacher entropy (nats);
- ids_per_position.png — positions by the number of stored ids;
- label_rank.png — the actual next token: its rank in the stored set, and the share outside it;
- shards.png — bytes per token and mean captured mass per shard.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from teachercache.inspect.report import inspect_cache

FIGURES = ("captured_mass.png", "entropy.png", "ids_per_position.png", "label_rank.png", "shards.png")


def plot_cache(path: str | os.PathLike, out: str | os.PathLike, report: dict | None = None) -> list[Path]:
    """Write the figures of the cache at ``path`` into directory ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = report or inspect_cache(path, sample_batches=1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(path).name
    written = []
    for file, draw in zip(FIGURES, (_captured, _entropy, _sizes, _rank, _shards)):
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        draw(ax, report)
        ax.set_title(f"{ax.get_title()} — {name}", fontsize=11)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / file)
        plt.close(fig)
        written.append(out / file)
    return written


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _hist_bars(ax, summary: dict, scale: float = 1.0, merge: int = 1) -> None:
    h = summary.get("histogram")
    if not h:
        ax.text(0.5, 0.5, "no target positions", ha="center", transform=ax.transAxes)
        return
    edges, counts = np.asarray(h["edges"]), np.asarray(h["counts"], np.float64)
    n = len(counts) // merge * merge
    counts = counts[:n].reshape(-1, merge).sum(axis=1)
    edges = edges[:n + 1:merge]
    last = np.flatnonzero(counts)[-1] + 1 if counts.any() else len(counts)
    share = counts / max(summary["count"], 1) * 100
    ax.bar(edges[:last] * scale, share[:last], width=np.diff(edges)[:last] * scale, align="edge",
           color="#4c72b0", edgecolor="none")
    ax.set_ylabel("share of target positions (%)")


def _captured(ax, report):
    c = report["captured_mass"]
    _hist_bars(ax, c, scale=100, merge=4)
    ax.set_xlabel("captured mass of the stored ids, 1 − rest mass (%)")
    ax.set_xlim(0, 100)
    ax.set_title("Captured mass per position")
    if c["count"]:
        ax.axvline(c["mean"] * 100, color="k", ls="--", lw=1, label=f"mean {c['mean']:.1%}")
        ax.legend()


def _entropy(ax, report):
    h = report["entropy"]
    _hist_bars(ax, h, merge=4)
    ax.set_xlabel("teacher entropy over the full vocabulary (nats)")
    ax.set_title("Teacher entropy per position")
    if h["count"]:
        ax.axvline(h["mean"], color="k", ls="--", lw=1, label=f"mean {h['mean']:.2f} nats")
        ax.legend()


def _int_bars(ax, summary: dict, xlabel: str) -> None:
    counts = summary.get("counts") or {}
    if not counts:
        ax.text(0.5, 0.5, "no positions", ha="center", transform=ax.transAxes)
        return
    xs = np.array([int(k) for k in counts])
    ys = np.array(list(counts.values()), np.float64) / summary["count"] * 100
    ax.bar(xs, ys, width=0.9, color="#55a868")
    _integer_ticks(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of target positions (%)")


def _sizes(ax, report):
    _int_bars(ax, report["ids_per_position"], "stored ids per position (count)")
    ax.set_title("Stored ids per position")


def _rank(ax, report):
    lab = report["label"]
    r = lab["rank_in_set"]
    counts = r.get("counts") or {}
    total = report["ids_per_position"].get("count", 0)
    if total:
        xs = [int(k) for k in counts]
        ys = [v / total * 100 for v in counts.values()]
        ax.bar(xs, ys, width=0.9, color="#55a868", label="in the stored set, at this rank")
        ax.bar([0], [lab["out_of_set_share"] * 100], width=0.9, color="#c44e52",
               label=f"outside the stored set ({lab['out_of_set_share']:.1%})")
        ax.legend()
    _integer_ticks(ax)
    ax.set_xlabel("rank of the actual next token in the stored set (1 = teacher's top id; 0 = not stored)")
    ax.set_ylabel("share of target positions (%)")
    ax.set_title("Where the actual next token is")


def _shards(ax, report):
    shards = report.get("per_shard") or []
    x = np.arange(len(shards))
    ax.bar(x, [s["bytes_per_token"] for s in shards], color="#8172b2")
    _integer_ticks(ax)
    ax.set_xlabel("shard (manifest order)")
    ax.set_ylabel("bytes per token")
    ax.set_title("Shards: size and captured mass")
    twin = ax.twinx()
    twin.plot(x, [s["captured_mass"] * 100 for s in shards], "o-", color="#dd8452")
    twin.set_ylabel("mean captured mass (%)", color="#dd8452")
    twin.set_ylim(0, 100)
