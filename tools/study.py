"""The distillation study on the bundled default: which cached target is worth its bytes?

Same student architecture, steps, batches, schedule and seeds in every arm; each trained from a cache of
the demo teacher over the same training rows (or, for the two baselines, from the rows' tokens alone /
the live teacher), evaluated on the held-out split data/corpus/valid.parquet:

    ce              CE only (no teacher)
    top8-rest       top-8,  forward KL with the rest bucket
    top8-renorm     top-8,  forward KL to the teacher renormalised over the stored ids (Axolotl's loss)
    top64-rest      top-64, rest bucket
    top64-renorm    top-64, renormalised
    nucleus         nucleus top_p 0.95 (min 1, max 64), rest bucket
    sampled         64 draws per position (RS-KD), sampled cross-entropy
    sampled-hint    sampled + hint loss (MSE) from teacher layer 2 to student layer 2
    sampled16       16 draws per position: fewer bytes, more variance
    top64-renorm-ce top-64 renormalised, mixed half and half with CE (the other KD arms use KD alone)
    online          full online KD: forward KL to the live teacher's full distribution

Reports per arm: held-out perplexity (mean ± half the spread over seeds), ECE, cache bytes per token,
mean stored ids per position, student tokens/s, and the share of full-KD's perplexity gain over CE
that the arm recovers: (ppl_CE - ppl_arm) / (ppl_CE - ppl_online). Writes docs/study.md-ready
markdown, results JSON and a PNG.

    python tools/study.py --out runs/study                  # the committed figures (about an hour on 2 cores)
    python tools/study.py --out /tmp/s --steps 20 --seeds 1 --docs 4   # a smoke run

The caches cover the whole train split by default (221 files, about 1 M tokens): the held-out split has
the same mix of code and generated codec tables (data/README.md), so held-out perplexity measures what
the student learnt, not how far the held-out files are from the first few training files.

Ends with one JSON line of the figures.

``--cross-tokenizer`` runs the cross-tokenizer study instead (CROSS_ARMS below, docs/cross_tokenizer.md): on
the top-64 cache, students with the teacher's tokenizer (CE twin, KD) and with their own
SentencePiece-style BPE (tools/make_student_tokenizer.py: CE twin, ``exact``, ``uld``), compared in bits per
byte on the held-out split:

    python tools/study.py --cross-tokenizer --out runs/study          # shares the main study's top-64 cache

``--frontier-from docs/data/study_2026-11-29.json`` trains nothing: it builds the caches (as this release writes
them) and plots the earlier runs' perplexities against their bytes per token (frontier.md, frontier.png).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "data" / "teacher"
TRAIN = ROOT / "data" / "corpus" / "train.parquet"
VALID = ROOT / "data" / "corpus" / "valid.parquet"

CACHES = {
    "top8": dict(kind="topk", k=8),
    "top64": dict(kind="topk", k=64),
    "nucleus": dict(kind="nucleus", top_p=0.95, min_k=1, max_k=64),
    "sampled": dict(kind="sample", samples=64, seed=0),
    "sampled16": dict(kind="sample", samples=16, seed=0),
}
ARMS = {  # the cache, then TrainOptions fields (kd: KDOptions, hint: HintOptions)
    "ce": dict(cache="top8", kd=dict(ce_weight=1.0, kd_weight=0.0)),
    "top8-rest": dict(cache="top8", kd=dict(tail="rest")),
    "top8-renorm": dict(cache="top8", kd=dict(tail="renormalize")),
    "top64-rest": dict(cache="top64", kd=dict(tail="rest")),
    "top64-renorm": dict(cache="top64", kd=dict(tail="renormalize")),
    "nucleus": dict(cache="nucleus", kd=dict(tail="rest")),
    "sampled": dict(cache="sampled"),
    "sampled-hint": dict(cache="sampled", hint=dict(layers="2:2", weight=0.1)),
    "sampled16": dict(cache="sampled16"),
    "top64-renorm-ce": dict(cache="top64", kd=dict(tail="renormalize", ce_weight=0.5, kd_weight=0.5)),
    "online": dict(cache="top8", online_teacher=str(TEACHER)),
}


def build_caches(work: Path, docs: int, seq_len: int) -> dict:
    from teachercache.format.cache import Cache
    from teachercache.format.manifest import TargetSpec
    from teachercache.teacher.build import BuildOptions, build_cache
    from teachercache.teacher.corpus import DataOptions

    info = {}
    data = DataOptions(paths=(str(TRAIN),), seq_len=seq_len, max_docs=docs)
    for name, spec in CACHES.items():
        path = work / "caches" / name
        if not (path / "manifest.json").exists():
            build_cache(BuildOptions(teacher=str(TEACHER), data=data, out=str(path), progress=False,
                                     targets=TargetSpec(**spec), hidden_layers=(2,) if name == "sampled" else (),
                                     resume=path.exists()))   # an interrupted study continues its build
        cache = Cache.open(path)
        t = cache.manifest.totals
        hidden = sum(b for c, b in _column_bytes(cache).items() if c.startswith("hidden"))
        info[name] = {"bytes_per_token": (t.bytes - hidden) / t.tokens, "hidden_bytes_per_token": hidden / t.tokens,
                      "ids_per_position": t.target_entries / t.target_positions, "tokens": t.tokens}
    return info


def _column_bytes(cache) -> dict:
    from teachercache.inspect.report import column_bytes_estimate

    return column_bytes_estimate(cache)


def run_arm(work: Path, arm: str, seed: int, args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from teachercache.student.evaluate import evaluate_model
    from teachercache.student.options import HintOptions, KDOptions, ScheduleOptions, TrainOptions
    from teachercache.student.train import METRICS_FILE, train

    kw = dict(ARMS[arm])
    cache = work / "caches" / kw.pop("cache")
    out = work / "runs" / f"{arm}-seed{seed}"
    if not (out / "model.safetensors").exists():
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        schedule = ScheduleOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                   warmup_steps=max(1, args.steps // 20))
        train(TrainOptions(cache=str(cache), student=args.student, out=str(out), schedule=schedule, seed=seed,
                           progress=False, log_every=10, kd=KDOptions(**kw.pop("kd", {})),
                           hint=HintOptions(**kw.pop("hint", {})), **kw))
    records = [json.loads(x) for x in (out / METRICS_FILE).read_text().splitlines()]
    seconds = sum(r["seconds"] for r in records) * (args.steps / max(1, len(records)))
    tokens = sum(r["positions"] for r in records) * (args.steps / max(1, len(records)))
    tok = AutoTokenizer.from_pretrained(cache / "tokenizer")
    result = evaluate_model(AutoModelForCausalLM.from_pretrained(out), str(VALID), tok, seq_len=args.seq_len)
    return {"perplexity": result.perplexity, "ece": result.ece, "tokens_per_s": tokens / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--student", default="llama-small")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--docs", type=int, default=None,
                    help="Cache only the first N training documents (default: all).")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--arms", nargs="*", default=list(ARMS))
    ap.add_argument("--cross-tokenizer", action="store_true",
                    help="Run the cross-tokenizer study instead (CROSS_ARMS; see cross_tokenizer_study).")
    ap.add_argument("--frontier-from", metavar="JSON",
                    help="Train nothing: plot the quality-per-byte frontier of the arms' perplexities in JSON ({arm: "
                         "{perplexity, spread}}, e.g. an earlier study.json's results) against the bytes per token of "
                         "the caches as this release builds them (built in --out if missing).")
    ap.add_argument("--evaluate-only", action="store_true",
                    help="Evaluate and tabulate the runs already in --out (any seeds); train nothing.")
    args = ap.parse_args()
    if args.cross_tokenizer:
        cross_tokenizer_study(args)
        return
    work = Path(args.out)
    t0 = time.perf_counter()
    caches = build_caches(work, args.docs, args.seq_len)
    if args.frontier_from:
        frontier_only(work, caches, json.loads(Path(args.frontier_from).read_text()))
        return
    results = {}
    for arm in args.arms:
        seeds = list(range(args.seeds))
        if args.evaluate_only:   # report the runs that exist, train nothing
            seeds = [s for s in seeds if (work / "runs" / f"{arm}-seed{s}" / "model.safetensors").exists()]
            if not seeds:
                continue
        runs = [run_arm(work, arm, seed, args) for seed in seeds]
        ppl = [r["perplexity"] for r in runs]
        cache = ARMS[arm].get("cache")
        kd_arm = arm not in ("ce", "online")
        results[arm] = {"perplexity": statistics.mean(ppl), "spread": (max(ppl) - min(ppl)) / 2,
                        "runs": ppl, "seeds": len(runs), "ece": statistics.mean(r["ece"] for r in runs),
                        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in runs),
                        "bytes_per_token": caches[cache]["bytes_per_token"] if kd_arm else None,
                        "hidden_bytes_per_token": caches[cache]["hidden_bytes_per_token"] if arm == "sampled-hint" else None,
                        "ids_per_position": caches[cache]["ids_per_position"] if kd_arm else None}
        print(f"{arm:13s} ppl {results[arm]['perplexity']:.3f} ± {results[arm]['spread']:.3f}  "
              f"ECE {results[arm]['ece']:.4f}", flush=True)
    if "ce" in results and "online" in results:
        gain = results["ce"]["perplexity"] - results["online"]["perplexity"]
        for r in results.values():
            r["recovered"] = (results["ce"]["perplexity"] - r["perplexity"]) / gain if gain else None
    table = format_table(results)
    (work / "study.md").write_text(table + "\n")
    (work / "study.json").write_text(json.dumps({"args": vars(args), "results": results, "caches": caches},
                                                indent=1))
    plot(results, work / "study.png")
    plot_frontier(results, work / "frontier.png")
    print(table)
    print(f"wall {time.perf_counter() - t0:.0f} s; table {work / 'study.md'}, plot {work / 'study.png'}")
    print(json.dumps({"bench": "study", "args": vars(args), "results": results}))


def format_table(results: dict) -> str:
    lines = ["| arm | seeds | val perplexity | ECE | cache bytes/token | ids/position | student tokens/s | gain recovered |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for arm, r in results.items():
        bpt = "—" if r["bytes_per_token"] is None else f"{r['bytes_per_token']:.1f}"
        if r.get("hidden_bytes_per_token"):
            bpt += f" (+{r['hidden_bytes_per_token']:.0f} hidden)"
        ids = "—" if r["ids_per_position"] is None else f"{r['ids_per_position']:.1f}"
        rec = "—" if r.get("recovered") is None or arm in ("ce", "online") else f"{100 * r['recovered']:.0f}%"
        lines.append(f"| {arm} | {r['seeds']} | {r['perplexity']:.3f} ± {r['spread']:.3f} | {r['ece']:.4f} | {bpt} | {ids} | "
                     f"{r['tokens_per_s']:.0f} | {rec} |")
    return "\n".join(lines)


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    by_x = {}   # arms sharing a cache share an x: their labels are spread out vertically, in ppl order
    for arm, r in results.items():
        x = r["bytes_per_token"] if r["bytes_per_token"] is not None else 0.0
        by_x.setdefault(round(x, 1), []).append((r["perplexity"], arm, x, r))
    for group in by_x.values():
        group.sort()
        for rank, (ppl, arm, x, r) in enumerate(group):
            ax.errorbar([x], [ppl], yerr=[r["spread"]], fmt="o", capsize=3)
            ax.annotate(arm, (x, ppl), textcoords="offset points", fontsize=8, va="center",
                        xytext=(6, 11 * (rank - (len(group) - 1) / 2)))
    ax.set(title="Student held-out perplexity vs cache size (demo teacher)",
           xlabel="cache bytes per token (0: CE only / online teacher)", ylabel="held-out perplexity")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def frontier_only(work: Path, caches: dict, earlier: dict) -> None:
    """--frontier-from: the earlier runs' perplexities (``earlier``: {arm: {perplexity, spread}} or a study.json)
    beside the bytes per token of the caches just built, as a table (frontier.md) and the frontier plot. Valid
    when the earlier runs trained on the same decoded targets (a new codec that stores the same values)."""
    earlier = earlier.get("results", earlier)
    results = {}
    for arm, r in earlier.items():
        cache = ARMS[arm].get("cache") if arm in ARMS else None
        kd_arm = arm not in ("ce", "online") and cache is not None
        results[arm] = {"perplexity": r["perplexity"], "spread": r.get("spread", 0.0),
                        "bytes_per_token": caches[cache]["bytes_per_token"] if kd_arm else None,
                        "hidden_bytes_per_token": caches[cache]["hidden_bytes_per_token"] if arm == "sampled-hint" else None}
    lines = ["| arm | val perplexity (earlier runs) | cache bytes/token now | ids/position |", "| --- | ---: | ---: | ---: |"]
    for arm, r in results.items():
        cache = ARMS.get(arm, {}).get("cache")
        b = f"{r['bytes_per_token']:.1f}" if r["bytes_per_token"] else "—"
        ids = f"{caches[cache]['ids_per_position']:.1f}" if r["bytes_per_token"] else "—"
        lines.append(f"| {arm} | {r['perplexity']:.1f} ± {r['spread']:.1f} | {b} | {ids} |")
    table = "\n".join(lines)
    (work / "frontier.md").write_text(table + "\n")
    plot_frontier(results, work / "frontier.png")
    print(table)
    print(json.dumps({"bench": "study-frontier", "caches": caches, "results": results}))


def plot_frontier(results: dict, png: Path, title: str = "Quality per byte (demo teacher)") -> None:
    """The quality-per-byte frontier: held-out perplexity (± half the seeds' spread) against cache bytes per
    token for each cached arm, marker by target kind (the arm's name up to its first "-"), the frontier (the
    best perplexity reached at or below each byte count) as a step line, CE only and online KD as horizontal
    lines (they store no targets). Hint arms are left out: their hidden states cost ~380 more bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    cached = {arm: r for arm, r in results.items() if r.get("bytes_per_token") and not r.get("hidden_bytes_per_token")}
    markers = dict(zip(sorted({arm.split("-")[0] for arm in cached}), "osD^vP*X"))
    for arm, r in sorted(cached.items(), key=lambda kv: kv[1]["bytes_per_token"]):
        ax.errorbar([r["bytes_per_token"]], [r["perplexity"]], yerr=[r["spread"]], fmt=markers[arm.split("-")[0]],
                    capsize=3, label=arm)
    points = sorted((r["bytes_per_token"], r["perplexity"]) for r in cached.values())
    frontier, best = [], float("inf")
    for x, ppl in points:
        best = min(best, ppl)
        frontier.append((x, best))
    if frontier:
        xs, ys = zip(*frontier)
        ax.step(xs, ys, where="post", color="k", alpha=0.5, label="frontier")
    for name, style in (("ce", ":"), ("online", "--")):
        if name in results:
            ax.axhline(results[name]["perplexity"], color="gray", linestyle=style,
                       label=f"{'CE only' if name == 'ce' else 'online KD'} ({results[name]['perplexity']:.1f})")
    ax.set(title=title, xlabel="cache bytes per token (all columns)", ylabel="held-out perplexity", xscale="log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------
# The cross-tokenizer study (--cross-tokenizer): a student with its own tokenizer learns from the top-64 cache

CROSS_ARMS = {  # TrainOptions fields; "own": the student with its own tokenizer (tools/make_student_tokenizer.py)
    "same-ce": dict(kd=dict(ce_weight=1.0, kd_weight=0.0)),
    "same-kd": dict(kd=dict(tail="rest")),
    "own-ce": dict(own=True, cross_tokenizer="exact", kd=dict(ce_weight=1.0, kd_weight=0.0)),
    "own-exact": dict(own=True, cross_tokenizer="exact", kd=dict(tail="rest")),
    "own-uld": dict(own=True, cross_tokenizer="uld", kd=dict(ce_weight=1.0, kd_weight=1.0)),
}
"""same-*: the teacher's tokenizer (CE twin, forward KL + rest: the study's top64-rest arm); own-*: its own
SentencePiece-style BPE of the same size, the CE twin (CE at every position of its own tokens), ``exact``
(KD only at aligned positions, CE at the others) and ``uld`` (CE + ULD at aligned positions, CE at the others)."""


def cross_tokenizer_study(args) -> None:
    """The CROSS_ARMS on the top-64 cache of the whole train split (the main study's, built if missing), every
    student evaluated in bits per byte on the held-out split with its own tokenizer. Writes cross_tokenizer.md
    and cross_tokenizer.json in --out; "gain recovered" = (bpb own-ce - bpb arm) / (bpb same-ce - bpb same-kd)."""
    import sys

    from teachercache.format.cache import Cache
    from teachercache.format.manifest import TargetSpec
    from teachercache.teacher.build import BuildOptions, build_cache
    from teachercache.teacher.corpus import DataOptions

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_student_tokenizer import make_student

    work = Path(args.out)
    t0 = time.perf_counter()
    cache = work / "caches" / "top64"
    if not (cache / "manifest.json").exists():
        build_cache(BuildOptions(teacher=str(TEACHER), out=str(cache), progress=False, targets=TargetSpec(**CACHES["top64"]),
                                 data=DataOptions(paths=(str(TRAIN),), seq_len=args.seq_len, max_docs=args.docs),
                                 resume=cache.exists()))
    own = {seed: work / "own-student" / f"seed{seed}" for seed in range(args.seeds)}
    for seed, path in own.items():
        if not (path / "model.safetensors").exists():
            make_student(path, 8192, args.student, seed)
    stats = _cross_stats(Cache.open(cache), own[0])
    print(json.dumps({"alignment": stats}), flush=True)
    arms = [a for a in args.arms if a in CROSS_ARMS] or list(CROSS_ARMS)
    results = {}
    for arm in arms:
        runs = [_cross_run(work, cache, arm, seed, own[seed], args) for seed in range(args.seeds)]
        bpb = [r["bits_per_byte"] for r in runs]
        results[arm] = {"bits_per_byte": statistics.mean(bpb), "spread": (max(bpb) - min(bpb)) / 2, "runs": bpb,
                        "perplexity": statistics.mean(r["perplexity"] for r in runs),
                        "ece": statistics.mean(r["ece"] for r in runs), "seeds": len(runs),
                        "parameters": runs[0]["parameters"], "vocab": runs[0]["vocab"],
                        "positions_per_step": statistics.mean(r["positions_per_step"] for r in runs),
                        "seconds": statistics.mean(r["seconds"] for r in runs)}
        print(f"{arm:10s} bpb {results[arm]['bits_per_byte']:.4f} ± {results[arm]['spread']:.4f}  "
              f"ppl {results[arm]['perplexity']:.2f}", flush=True)
    if {"same-ce", "same-kd", "own-ce"} <= set(results):
        gain = results["same-ce"]["bits_per_byte"] - results["same-kd"]["bits_per_byte"]
        for name, r in results.items():
            base = results["own-ce" if name.startswith("own") else "same-ce"]["bits_per_byte"]
            r["recovered"] = (base - r["bits_per_byte"]) / gain if gain > 0 else None  # no gain to recover
    table = format_cross_table(results, stats)
    (work / "cross_tokenizer.md").write_text(table + "\n")
    (work / "cross_tokenizer.json").write_text(json.dumps({"args": vars(args), "alignment": stats,
                                                           "results": results}, indent=1))
    print(table)
    print(f"wall {time.perf_counter() - t0:.0f} s")
    print(json.dumps({"bench": "study-cross-tokenizer", "args": vars(args), "alignment": stats, "results": results}))


def _cross_stats(cache, student_dir: Path) -> dict:
    """Over every row of the cache: the id map's shared ids, the alignment share, and how much of the stored
    teacher mass at aligned positions has a student id (the rest joins the rest bucket under ``exact``)."""
    import numpy as np
    from transformers import AutoTokenizer

    from teachercache.student.cross_tokenizer import Aligner
    from teachercache.student.dataset import CacheDataset

    aligner = Aligner.of(cache.tokenizer(), AutoTokenizer.from_pretrained(student_dir))
    student = teacher = aligned = 0
    stored = mapped = 0.0
    for row in CacheDataset(cache, shuffle=False, rank=0, world_size=1):
        a = aligner.align(row["input_ids"], row["target_mask"])
        student += int(a.target_mask.sum())
        teacher += int(row["target_mask"].sum())
        for i in a.teacher_index[a.teacher_index >= 0]:
            e = slice(row["target_offsets"][i], row["target_offsets"][i + 1])
            p = np.exp(row["target_logprobs"][e].astype(np.float64))
            stored += p.sum()
            mapped += p[aligner.token_map.student_ids[row["target_ids"][e]] >= 0].sum()
            aligned += 1
    return {"shared_ids": aligner.token_map.shared, "teacher_vocab": len(aligner.token_map.student_ids),
            "student_positions": student, "teacher_positions": teacher, "aligned": aligned,
            "share": aligned / student, "teacher_share": aligned / teacher, "stored_mass": stored / aligned,
            "mapped_mass": mapped / aligned}


def _cross_run(work: Path, cache: Path, arm: str, seed: int, own: Path, args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from teachercache.student.evaluate import evaluate_model
    from teachercache.student.options import KDOptions, ScheduleOptions, TrainOptions
    from teachercache.student.train import METRICS_FILE, train

    kw = dict(CROSS_ARMS[arm])
    student = str(own) if kw.pop("own", False) else args.student
    out = work / "runs" / f"cross-{arm}-seed{seed}"
    if not (out / "model.safetensors").exists():
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        schedule = ScheduleOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                   warmup_steps=max(1, args.steps // 20))
        train(TrainOptions(cache=str(cache), student=student, out=str(out), schedule=schedule, seed=seed,
                           progress=False, log_every=10, kd=KDOptions(**kw.pop("kd", {})), **kw))
    records = [json.loads(x) for x in (out / METRICS_FILE).read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    result = evaluate_model(model, str(VALID), tok, seq_len=args.seq_len)
    return {"bits_per_byte": result.bits_per_byte, "perplexity": result.perplexity, "ece": result.ece,
            "parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tok),
            "positions_per_step": statistics.mean(r["positions"] for r in records),
            "seconds": sum(r["seconds"] for r in records) * (args.steps / max(1, len(records)))}


def format_cross_table(results: dict, stats: dict) -> str:
    names = {"same-ce": "teacher's tokenizer, CE only", "same-kd": "teacher's tokenizer, KD (top-64, rest)",
             "own-ce": "own tokenizer, CE only (twin)", "own-exact": "own tokenizer, `--cross-tokenizer exact`",
             "own-uld": "own tokenizer, `--cross-tokenizer uld` (+ CE)"}
    lines = ["| arm | seeds | val bits/byte | val perplexity (own tokens) | ECE | parameters | target positions/step | "
             "gain recovered (bits/byte) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for arm, r in results.items():
        rec = "—" if r.get("recovered") is None or arm in ("same-ce", "own-ce") else f"{100 * r['recovered']:.0f}%"
        lines.append(f"| {names.get(arm, arm)} | {r['seeds']} | {r['bits_per_byte']:.4f} ± {r['spread']:.4f} | "
                     f"{r['perplexity']:.2f} | {r['ece']:.4f} | {r['parameters'] / 1e6:.2f} M | "
                     f"{r['positions_per_step']:.0f} | {rec} |")
    lines.append("")
    lines.append(f"Alignment over the cache: {stats['aligned']:,} aligned of {stats['student_positions']:,} student "
                 f"target positions ({100 * stats['share']:.1f}%; {100 * stats['teacher_share']:.1f}% of the teacher's "
                 f"{stats['teacher_positions']:,}); {stats['shared_ids']:,} of {stats['teacher_vocab']:,} teacher ids have "
                 f"a student twin; at aligned positions {100 * stats['mapped_mass'] / stats['stored_mass']:.1f}% of the "
                 "stored teacher mass maps to student ids.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
