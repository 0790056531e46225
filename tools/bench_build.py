"""Benchmark of the teacher pass on the demo teacher (CPU): build overhead and memory.

(a) the bare teacher forward over the same batches the build makes (rows from teachercache.teacher.corpus, the same
    batch size, logits computed and dropped); (b) the full build (targets, encoding in the writer
    thread, shards, manifest); (b') the same with the targets computed by the torch path instead of the
    numba one a CPU teacher gets. All timed without loading the model. Prints (b)/(a), (b')/(a), tokens/s,
    bytes/token and the peak RSS of each, (b)/(a) of each alternating pair (run-to-run noise on a shared
    machine is several percent), then the peak RSS of builds over 1x and 10x the input (each in its own
    process, so the peaks are its own). The input is the first --docs documents of the corpus,
    written once (1x) or ten times over (10x) to a jsonl file.

    python tools/bench_build.py                 # ~9 minutes on 2 CPU cores
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys, time
import torch
from teachercache.teacher.build import BuildOptions, build_cache
from teachercache.teacher.corpus import DataOptions, DocumentCounts, iter_packed_rows
from teachercache.format.manifest import TargetSpec
mode, teacher, data, out, seq_len, batch, threads = sys.argv[1:]
torch.set_num_threads(int(threads))
opts = BuildOptions(teacher=teacher, out=out, batch_size=int(batch), progress=False,
                    data=DataOptions(paths=(data,), seq_len=int(seq_len)),
                    targets=TargetSpec(kind="topk", k=64),
                    targets_backend="torch" if mode == "build-torch" else "auto")
t0 = time.perf_counter()
if mode == "forward":
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    rows = list(iter_packed_rows(opts.data, tok, DocumentCounts()))
    tokens = 0
    with torch.no_grad():
        for i in range(0, len(rows), opts.batch_size):
            batch = rows[i:i + opts.batch_size]
            T = max(len(r.input_ids) for r in batch)
            ids = torch.zeros((len(batch), T), dtype=torch.long)
            for b, r in enumerate(batch):
                ids[b, :len(r.input_ids)] = torch.from_numpy(r.input_ids.astype("int64"))
            model(input_ids=ids).logits.float().sum().item()
            tokens += sum(len(r.input_ids) for r in batch)
    result = {"tokens": tokens, "bytes": 0}
else:
    r = build_cache(opts)
    t0 += r.load_seconds
    result = {"tokens": r.tokens, "bytes": r.bytes}
result["seconds"] = time.perf_counter() - t0
result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(result))
"""


def run(mode: str, args, data: Path, out: Path) -> dict:
    cmd = [sys.executable, "-c", CHILD, mode, str(args.teacher), str(data), str(out), str(args.seq_len),
           str(args.batch_size), str(args.threads)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", type=Path, default=ROOT / "data" / "teacher")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "corpus" / "train.parquet")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--docs", type=int, default=20, help="documents of the 1x input")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--repeats", type=int, default=3, help="runs of (a), (b) and (b'), alternating; best counts")
    args = ap.parse_args()

    texts = pq.read_table(args.data, columns=["text"]).column("text").to_pylist()[: args.docs]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one, many = tmp / "one.jsonl", tmp / "ten.jsonl"
        one.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        many.write_text(one.read_text() * 10)
        fwd, full, full_torch = [], [], []
        for i in range(args.repeats):  # alternate, so that a noisy minute hurts all alike
            fwd.append(run("forward", args, one, tmp / f"f{i}"))
            full.append(run("build", args, one, tmp / f"b{i}"))
            full_torch.append(run("build-torch", args, one, tmp / f"t{i}"))
        a = min(fwd, key=lambda r: r["seconds"])
        b = min(full, key=lambda r: r["seconds"])
        bt = min(full_torch, key=lambda r: r["seconds"])
        ten = run("build", args, many, tmp / "ten")
    ratio = b["seconds"] / a["seconds"]
    pairs = sorted(f["seconds"] / fw["seconds"] for f, fw in zip(full, fwd))  # each (b) over the (a) just before it
    print(f"input: the first {args.docs} documents of {args.data.name}, seq_len {args.seq_len}, batch {args.batch_size}, "
          f"{args.threads} torch threads; {b['tokens']:,} tokens")
    print(f"(a) bare forward   {a['seconds']:7.2f} s  {a['tokens'] / a['seconds']:8.0f} tokens/s  "
          f"peak RSS {a['peak_rss_mb']:.0f} MB")
    print(f"(b) full build     {b['seconds']:7.2f} s  {b['tokens'] / b['seconds']:8.0f} tokens/s  "
          f"peak RSS {b['peak_rss_mb']:.0f} MB  {b['bytes'] / b['tokens']:.1f} bytes/token")
    print(f"(b') torch targets {bt['seconds']:7.2f} s  {bt['tokens'] / bt['seconds']:8.0f} tokens/s")
    print(f"(b)/(a) = {ratio:.3f}   (target <= 1.15);  (b')/(a) = {bt['seconds'] / a['seconds']:.3f};  "
          f"(b)/(a) of each alternating pair: {', '.join(f'{r:.3f}' for r in pairs)}")
    print(f"10x input: {ten['tokens']:,} tokens, peak RSS {ten['peak_rss_mb']:.0f} MB = "
          f"{ten['peak_rss_mb'] / b['peak_rss_mb']:.3f} x the 1x build (target <= 1.1)")
    print(json.dumps({"bench": "build", "ratio": ratio, "ratio_torch_targets": bt["seconds"] / a["seconds"],
                      "pair_ratios": pairs,
                      "forward": a, "build": b, "build_torch_targets": bt, "build_10x": ten,
                      "rss_10x_over_1x": ten["peak_rss_mb"] / b["peak_rss_mb"]}))


if __name__ == "__main__":
    main()
