"""Benchmark of the teacher pass on the demo teacher (CPU): build overhead and memory.

(a) the bare teacher forward over the same batches the build makes (rows from teachercache.teacher.corpus, the same
    batch size, logits computed and dropped); (b) the full build (targets, encoding in the writer
    thread, shards, manifest); (b') the same with the targets computed by the torch path instead of the
    numba one a CPU teacher gets; (b'') the full build through the model's whole forward (``--head-chunk 0``:
    every logit of the batch at once, the path before the head ran over chunks of positions). All timed
    without loading the model. Prints (b)/(a), (b')/(a), (b)/(b''), tokens/s, bytes/token and the peak RSS
    of each, (b)/(a) of each alternating pair (run-to-run noise on a shared machine is several percent),
    then the peak RSS of builds over 1x and 10x the input (each in its own process, so the peaks are its
    own). The input is the first --docs documents of the corpus, written once (1x) or ten times over (10x)
    to a jsonl file.

    python tools/bench_build.py                 # ~12 minutes on 2 CPU cores

``--memory``: instead, the teacher pass's memory at a Qwen-sized vocabulary. A random-initialised Llama
of ~100M parameters (hidden 512, 4 layers, tied embeddings) with a 152,064-row head and a word-level
tokenizer of 151,936 ids (the corpus' words among them, the rest filler words), built and saved to a temp
dir; the corpus is the first documents of data/corpus/valid.parquet, packed (concat) into rows of
seq-len 512, 1024, 2048, 4096 at a fixed --token-budget per batch (batch = budget / seq-len). For each
shape, a build through the chunked head and one through the whole forward (--head-chunk 0), each in its
own process: peak RSS, and the pass's own share (peak minus the RSS after loading).

    python tools/bench_build.py --memory        # ~10 minutes on 2 CPU cores
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
                    targets_backend="torch" if mode == "build-torch" else "auto",
                    head_chunk=0 if mode == "build-whole" else BuildOptions.head_chunk)
import teachercache.teacher.build as build_module
real_load, loaded = build_module.load_teacher, {}
def load_and_measure(*a, **k):  # the RSS once the teacher is loaded: the pass's own memory is the peak above it
    result = real_load(*a, **k)
    loaded["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result
build_module.load_teacher = load_and_measure
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
result["loaded_rss_mb"] = loaded.get("rss_mb")
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
    ap.add_argument("--repeats", type=int, default=3, help="runs of (a), (b), (b') and (b''), alternating; best counts")
    ap.add_argument("--memory", action="store_true", help="the memory table at V = 152k instead (docstring)")
    ap.add_argument("--token-budget", type=int, default=8192, help="--memory: tokens per batch")
    ap.add_argument("--seq-lens", default="512,1024,2048,4096", help="--memory: row lengths")
    args = ap.parse_args()
    if args.memory:
        return memory_table(args)

    texts = pq.read_table(args.data, columns=["text"]).column("text").to_pylist()[: args.docs]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one, many = tmp / "one.jsonl", tmp / "ten.jsonl"
        one.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        many.write_text(one.read_text() * 10)
        fwd, full, full_torch, whole = [], [], [], []
        for i in range(args.repeats):  # alternate, so that a noisy minute hurts all alike
            fwd.append(run("forward", args, one, tmp / f"f{i}"))
            full.append(run("build", args, one, tmp / f"b{i}"))
            full_torch.append(run("build-torch", args, one, tmp / f"t{i}"))
            whole.append(run("build-whole", args, one, tmp / f"w{i}"))
        a = min(fwd, key=lambda r: r["seconds"])
        b = min(full, key=lambda r: r["seconds"])
        bt = min(full_torch, key=lambda r: r["seconds"])
        bw = min(whole, key=lambda r: r["seconds"])
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
    print(f"(b'') whole forward {bw['seconds']:6.2f} s  {bw['tokens'] / bw['seconds']:8.0f} tokens/s  "
          f"peak RSS {bw['peak_rss_mb']:.0f} MB")
    chunked_pairs = sorted(f["seconds"] / w["seconds"] for f, w in zip(full, whole))
    print(f"(b)/(b'') = {b['seconds'] / bw['seconds']:.3f}   (target <= 1.05: the chunked head costs no time); "
          f"each alternating pair: {', '.join(f'{r:.3f}' for r in chunked_pairs)}")
    print(f"(b)/(a) = {ratio:.3f}   (target <= 1.15);  (b')/(a) = {bt['seconds'] / a['seconds']:.3f};  "
          f"(b)/(a) of each alternating pair: {', '.join(f'{r:.3f}' for r in pairs)}")
    print(f"10x input: {ten['tokens']:,} tokens, peak RSS {ten['peak_rss_mb']:.0f} MB = "
          f"{ten['peak_rss_mb'] / b['peak_rss_mb']:.3f} x the 1x build (target <= 1.1)")
    print(json.dumps({"bench": "build", "ratio": ratio, "ratio_torch_targets": bt["seconds"] / a["seconds"],
                      "pair_ratios": pairs, "chunked_over_whole": b["seconds"] / bw["seconds"],
                      "chunked_over_whole_pairs": chunked_pairs,
                      "forward": a, "build": b, "build_torch_targets": bt, "build_whole_forward": bw,
                      "build_10x": ten,
                      "rss_10x_over_1x": ten["peak_rss_mb"] / b["peak_rss_mb"]}))


def _qwen_sized_teacher(path: Path, texts: list[str]) -> None:
    """A random-initialised ~100M-parameter Llama with a 152,064-row head and a word-level tokenizer of 151,936
    ids (the corpus' words first, then filler words), saved to ``path``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["[UNK]", "</s>"]
    seen = set(words)
    for t in texts:
        for w in t.split():
            if w not in seen and len(words) < 151_936:
                seen.add(w)
                words.append(w)
    words += [f"w{i}" for i in range(151_936 - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>").save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=152_064, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
                      tie_word_embeddings=True, eos_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(path)


def memory_table(args) -> None:
    texts = pq.read_table(ROOT / "data" / "corpus" / "valid.parquet", columns=["text"]).column("text").to_pylist()
    seq_lens = [int(x) for x in args.seq_lens.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _qwen_sized_teacher(tmp / "teacher", texts)
        data = tmp / "corpus.jsonl"   # two batches' worth of tokens, packed into full rows
        words, chosen = 0, []
        for t in texts:
            chosen.append(t)
            words += len(t.split())
            if words > 2.2 * args.token_budget:
                break
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in chosen))
        args.teacher = tmp / "teacher"
        for T in seq_lens:
            args.seq_len, args.batch_size = T, max(args.token_budget // T, 1)
            for mode in ("build", "build-whole"):
                r = run(mode, args, data, tmp / f"{mode}-{T}")
                r.update(seq_len=T, batch=args.batch_size, path="chunked head" if mode == "build" else "whole forward",
                         pass_mb=r["peak_rss_mb"] - r["loaded_rss_mb"])
                rows.append(r)
                print(f"seq_len {T:5d} x batch {args.batch_size:3d}  {r['path']:13s}  peak RSS {r['peak_rss_mb']:7.0f} MB"
                      f"  (pass {r['pass_mb']:6.0f} MB above the loaded model)  {r['seconds']:6.1f} s", flush=True)
    chunked = [r for r in rows if r["path"] == "chunked head"]
    growth = chunked[-1]["peak_rss_mb"] / chunked[0]["peak_rss_mb"]
    print(f"chunked head: peak RSS at seq_len {seq_lens[-1]} / at {seq_lens[0]} = {growth:.3f} (target <= 1.10)")
    print(json.dumps({"bench": "build-memory", "token_budget": args.token_budget, "rows": rows,
                      "chunked_growth": growth}))


if __name__ == "__main__":
    main()
