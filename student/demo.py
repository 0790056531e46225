"""The main job on the bundled default: cache the demo teacher, distil a student from the cache, compare.

``teachercache demo --out runs/demo`` (what the README's quick start runs):

1. build a top-64 cache from data/teacher over 60 documents drawn across data/corpus/train.parquet (the
   teacher runs once);
2. train a student (preset ``llama-small``) from the cache alone with forward KL + rest bucket, and its
   CE-only twin (same architecture, seed, rows, steps and schedule) from the same rows' tokens;
3. evaluate the teacher and both students on the held-out split data/corpus/valid.parquet with the same
   code (``teachercache eval``): perplexity and ECE;
4. print a table (perplexity, ECE, cache bytes/token, wall time), write it as ``results.json`` and
   ``results.md``, and plot both students' held-out perplexity and training loss over the steps in
   ``loss_curves.png``.

Every artefact lands in --out: cache/, student-kd/, student-ce/, results.*, loss_curves.png.
"""

from __future__ import annotations

import json
import importlib.resources
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from teachercache.errors import check_number

DATA = Path(str(importlib.resources.files("teachercache.bundled")))
"""The bundled demo teacher and corpus: the repository's data/ folder, installed as package data of
``teachercache.bundled`` (so ``pip install teachercache`` then ``teachercache demo`` works)."""


@dataclass(frozen=True)
class DemoOptions:
    """The main job's knobs; the defaults are the run recorded in BENCHMARKS.md."""

    out: str = "runs/demo"
    """Directory for the cache, both students, the table and the plot."""
    teacher: str = str(DATA / "teacher")
    """The demo teacher (data/teacher)."""
    train_data: str = str(DATA / "corpus" / "train.parquet")
    """Corpus the teacher is run over."""
    valid_data: str = str(DATA / "corpus" / "valid.parquet")
    """Held-out split every model is evaluated on."""
    student: str = "llama-small"
    """Student preset, config or path."""
    max_docs: int | None = 60
    """Training documents to cache."""
    sample_docs: bool = True
    """Draw the max_docs documents at random (seeded by ``seed``) across the whole training split, kept in
    file order; off: the split's first max_docs."""
    seq_len: int = 256
    """Tokens per row."""
    k: int = 64
    """Ids stored per position (top-k)."""
    steps: int = 400
    """Optimizer steps per student."""
    batch_size: int = 8
    """Rows per step."""
    lr: float = 3e-3
    """Peak learning rate."""
    eval_every: int = 100
    """Held-out evaluation every N steps (each costs ~6 s on 2 cores)."""
    eval_rows: int | None = None
    """Evaluate on at most this many held-out rows."""
    seed: int = 0
    """Seed of both students."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self):
        """Every number checked before the teacher pass starts (OptionError naming the flag)."""
        for name, low in (("seq_len", 2), ("k", 1), ("steps", 1), ("batch_size", 1), ("eval_every", 0)):
            check_number("demo", f"{name} (--{name.replace('_', '-')})", getattr(self, name), low=low, integer=True)
        for name in ("max_docs", "eval_rows"):
            if getattr(self, name) is not None:
                check_number("demo", f"{name} (--{name.replace('_', '-')})", getattr(self, name), low=1, integer=True)
        check_number("demo", "lr (--lr)", self.lr, low=0, low_open=True)


SAMPLE_NAME = "train-sample.parquet"
"""In --out: the documents the demo's teacher pass reads when it samples the split."""


def sample_documents(path: str, n: int, seed: int, out: Path) -> str:
    """``n`` documents of the parquet file ``path`` drawn without replacement (numpy, seeded), in file order,
    written to out/SAMPLE_NAME; its path. The whole file when it has n documents or fewer."""
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if table.num_rows <= n:
        return path
    keep = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=n, replace=False))
    pq.write_table(table.take(keep), out / SAMPLE_NAME)
    return str(out / SAMPLE_NAME)


def run_demo(options: DemoOptions, echo=print) -> dict:
    """Steps 1-4 of the module docstring; returns the results table as a dict."""
    from teachercache.student.options import EvalOptions, KDOptions, ScheduleOptions, TrainOptions
    from teachercache.student.train import train
    from teachercache.format.cache import Cache
    from teachercache.format.manifest import TargetSpec
    from teachercache.teacher.build import BuildOptions, build_cache
    from teachercache.teacher.corpus import DataOptions

    started = time.perf_counter()
    out = Path(options.out)
    for name in ("cache", "student-kd", "student-ce"):
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    train_data, max_docs = options.train_data, options.max_docs
    if options.sample_docs and max_docs is not None:
        train_data, max_docs = sample_documents(options.train_data, max_docs, options.seed, out), None
    echo(f"[1/4] teacher pass: {options.teacher} over {train_data} -> {out / 'cache'}")
    t0 = time.perf_counter()
    build_cache(BuildOptions(
        teacher=options.teacher, out=str(out / "cache"), progress=options.progress, batch_size=8,
        data=DataOptions(paths=(train_data,), seq_len=options.seq_len, max_docs=max_docs),
        targets=TargetSpec(kind="topk", k=options.k)))
    build_seconds = time.perf_counter() - t0
    cache = Cache.open(out / "cache")
    totals = cache.manifest.totals
    bytes_per_token = totals.bytes / max(totals.tokens, 1)
    echo(f"      {totals.rows} rows, {totals.tokens} tokens, {bytes_per_token:.1f} bytes/token, "
         f"{build_seconds:.1f} s")

    runs = {}
    common = dict(cache=str(out / "cache"), student=options.student, seed=options.seed, progress=options.progress,
                  log_every=1, schedule=ScheduleOptions(steps=options.steps, batch_size=options.batch_size,
                                                        lr=options.lr, warmup_steps=max(1, options.steps // 20)),
                  eval=EvalOptions(data=options.valid_data, every=options.eval_every, rows=options.eval_rows,
                                   seq_len=options.seq_len))
    for step, (name, kd) in enumerate((("student-kd", KDOptions(kd_weight=1.0, ce_weight=0.0)),
                                       ("student-ce", KDOptions(kd_weight=0.0, ce_weight=1.0))), start=2):
        label = "KD from the cache" if name == "student-kd" else "CE only (the twin)"
        echo(f"[{step}/4] training {options.student}, {label}: {options.steps} steps -> {out / name}")
        t0 = time.perf_counter()
        train(TrainOptions(out=str(out / name), kd=kd, **common))
        runs[name] = time.perf_counter() - t0

    echo("[4/4] evaluating on the held-out split")
    rows = evaluate_all(options, out, {"teacher": build_seconds, **runs}, bytes_per_token)
    total_seconds = time.perf_counter() - started
    results = {"options": options.__dict__, "rows": rows, "cache_tokens": totals.tokens,
               "total_wall_seconds": round(total_seconds, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = format_table(rows)
    (out / "results.md").write_text(table + "\n")
    plot_curves(out, out / "loss_curves.png")
    echo("")
    echo(table)
    echo(f"\nplot: {out / 'loss_curves.png'}; the whole job: {results['total_wall_seconds'] / 60:.1f} minutes")
    return results


def evaluate_all(options: DemoOptions, out: Path, walls: dict[str, float], bytes_per_token: float) -> list[dict]:
    """Step 4: the teacher and both students on the held-out split, one table row each (``walls``: the
    seconds of the build and of each student's training)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from teachercache.student.evaluate import evaluate_model

    tokenizer = AutoTokenizer.from_pretrained(out / "cache" / "tokenizer", trust_remote_code=False)
    rows = []
    for name, path, bpt in (("teacher", options.teacher, None), ("student-kd", out / "student-kd", bytes_per_token),
                            ("student-ce", out / "student-ce", None)):
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False)
        r = evaluate_model(model, options.valid_data, tokenizer, seq_len=options.seq_len,
                           max_rows=options.eval_rows)
        rows.append({"model": name, "parameters": sum(p.numel() for p in model.parameters()),
                     "perplexity": round(r.perplexity, 3), "ece": round(r.ece, 4),
                     "cache_bytes_per_token": None if bpt is None else round(bpt, 2),
                     "wall_seconds": round(walls[name], 1)})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| model | parameters | val perplexity | ECE | cache bytes/token | wall time (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        bpt = "—" if r["cache_bytes_per_token"] is None else f"{r['cache_bytes_per_token']:.1f}"
        what = {"teacher": "teacher (wall: the cache build)", "student-kd": "student, KD from the cache",
                "student-ce": "student, CE only"}[r["model"]]
        lines.append(f"| {what} | {r['parameters'] / 1e6:.2f} M | {r['perplexity']:.2f} | {r['ece']:.4f} | {bpt} | "
                     f"{r['wall_seconds']:.1f} |")
    return "\n".join(lines)


def plot_curves(out: Path, png: Path) -> None:
    """Held-out perplexity and training loss of both students against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from teachercache.student.train import METRICS_FILE

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, colour in (("student-kd", "tab:blue"), ("student-ce", "tab:orange")):
        records = [json.loads(x) for x in (out / name / METRICS_FILE).read_text().splitlines()]
        evals = [(r["step"], r["eval"]["perplexity"]) for r in records if r.get("eval")]
        if evals:
            left.plot(*zip(*evals), marker="o", color=colour, label=name)
        right.plot([r["step"] for r in records], [r["loss"] for r in records], color=colour, alpha=0.8,
                   label=f"{name} ({'KD' if name == 'student-kd' else 'CE'} loss)")
    left.set(title="Held-out perplexity", xlabel="optimizer step", ylabel="perplexity (log scale)", yscale="log")
    right.set(title="Training loss", xlabel="optimizer step", ylabel="loss (nats per target token)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
