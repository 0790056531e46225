"""Cost of a student step from the cache vs a plain CE step, side by side on the same student and batches.

Builds two caches from the demo teacher over the same rows (top-64 and 64 sampled draws), then trains the
same student (same seed, same rows, no shuffle) for S steps in five modes, each in its own process:

    ce            CE only (the cache's targets unused): the baseline
    topk          cached top-64 KD (forward KL, rest bucket)
    sampled       cached sampled KD (sampled cross-entropy)
    topk_fused    cached top-64 KD with --fused-head (LM head + loss in chunks)
    online        online KD from the live teacher (the teacher forward included)

and prints the median step time (steps after the first 3) and the process's peak RSS for each, with the
ratios to CE. The modes run one after another, in ``--rounds`` rounds; each mode's best round counts,
so a burst of load on a shared machine does not land on one mode only. Targets: cached KD ÷ CE ≤ 1.10 in time and in peak memory.

    python tools/bench_train.py                   # llama-base student, 30 steps of 8 × 256 tokens
    python tools/bench_train.py --quick           # llama-small, 10 steps

Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "ce": dict(kd=dict(ce_weight=1.0, kd_weight=0.0)),
    "topk": dict(cache="topk"),
    "sampled": dict(cache="sampled"),
    "topk_fused": dict(cache="topk", fused_head=True),
    "online": dict(cache="topk", online_teacher=str(ROOT / "data" / "teacher")),
}


def build_caches(work: Path, docs: int, seq_len: int) -> None:
    from teachercache.format.manifest import TargetSpec
    from teachercache.teacher.build import BuildOptions, build_cache
    from teachercache.teacher.corpus import DataOptions

    data = DataOptions(paths=(str(ROOT / "data" / "corpus" / "train.parquet"),), seq_len=seq_len, max_docs=docs)
    for name, spec in (("topk", TargetSpec(kind="topk", k=64)),
                       ("sampled", TargetSpec(kind="sample", samples=64, seed=0))):
        if not (work / name / "manifest.json").exists():
            build_cache(BuildOptions(teacher=str(ROOT / "data" / "teacher"), data=data, out=str(work / name),
                                     targets=spec, progress=False))


def child(work: Path, mode: str, student: str, steps: int, batch: int) -> None:
    import torch

    from teachercache.student.options import KDOptions, LoaderOptions, ScheduleOptions, TrainOptions
    from teachercache.student.train import METRICS_FILE, train

    torch.manual_seed(0)
    kw = dict(MODES[mode])
    cache = kw.pop("cache", "topk")
    out = work / f"run-{mode}"
    train(TrainOptions(cache=str(work / cache), student=student, out=str(out),
                       schedule=ScheduleOptions(steps=steps, batch_size=batch), loader=LoaderOptions(shuffle=False),
                       kd=KDOptions(**kw.pop("kd", {})), progress=False, log_every=1, **kw))
    seconds = [json.loads(line)["seconds"] for line in (out / METRICS_FILE).read_text().splitlines()]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"mode": mode, "step_s": statistics.median(seconds[3:] or seconds), "peak_rss": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--student", default="llama-base")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--docs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2, help="Rounds of all modes; each mode's best round counts.")
    ap.add_argument("--work", default=None, help="Directory for the caches and runs (default: a temp dir).")
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.quick:
        args.student, args.steps, args.docs = "llama-small", 10, 8
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-train-"))
    if args.child:
        child(work, args.child, args.student, args.steps, args.batch_size)
        return
    build_caches(work, args.docs, args.seq_len)
    rows = {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for _ in range(args.rounds):       # modes alternate, the best round of each counts
        for mode in MODES:
            import shutil

            shutil.rmtree(work / f"run-{mode}", ignore_errors=True)
            proc = subprocess.run([sys.executable, __file__, "--child", mode, "--work", str(work), "--student",
                                   args.student, "--steps", str(args.steps), "--batch-size", str(args.batch_size)],
                                  capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            if mode not in rows or r["step_s"] < rows[mode]["step_s"]:
                rows[mode] = r
    base = rows["ce"]
    print(f"student {args.student}, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, vocab 8192")
    for mode, r in rows.items():
        r["time_over_ce"] = round(r["step_s"] / base["step_s"], 3)
        r["rss_over_ce"] = round(r["peak_rss"] / base["peak_rss"], 3)
        print(f"{mode:11s} step {r['step_s'] * 1000:7.1f} ms  ({r['time_over_ce']:.2f} x CE)   peak RSS "
              f"{r['peak_rss'] / 2**20:7.1f} MB  ({r['rss_over_ce']:.2f} x CE)")
    print(json.dumps({"bench": "train", "student": args.student, "steps": args.steps, "batch": args.batch_size,
                      "seq_len": args.seq_len, "modes": rows}))


if __name__ == "__main__":
    main()
