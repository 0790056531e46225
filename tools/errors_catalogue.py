"""Write docs/ERRORS.md: bad inputs to the real commands, and the exact message each gets.

    python tools/errors_catalogue.py          # runs every entry (a few minutes on 2 cores), rewrites the page
    python tools/errors_catalogue.py --check  # exit 1 if the page differs from what the commands say now

Every entry is run as a user would run it (``python -m teachercache ...`` in a subprocess) in a scratch
directory; the page shows the exit code and the last line of the output, with the scratch directory
written as ``$TMP``. tests/test_errors_catalogue.py re-runs a few entries and compares.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "ERRORS.md"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200", "CUDA_VISIBLE_DEVICES": ""}
TEACHER = "data/teacher"
CORPUS = "data/corpus/valid.parquet"
BUILD = ["build", "--teacher", TEACHER, "--data", CORPUS, "--seq-len", "64", "--max-docs", "1", "--k", "8",
         "--no-progress"]
TRAIN = ["train", "--cache", "$TMP/good", "--student", "llama-tiny", "--steps", "2", "--batch-size", "2",
         "--no-progress"]


def build(*flags, out="$OUT"):
    return BUILD + ["--out", out, *flags]


def train(*flags, out="$OUT"):
    return TRAIN + ["--out", out, *flags]


def _replace(args, old, new):
    args = list(args)
    args[args.index(old) + 1] = new
    return args


# (section, what is wrong, arguments after `teachercache`)
ENTRIES: list[tuple[str, str, list[str]]] = [
    ("build", "--teacher: no such directory", _replace(build(), "--teacher", "$TMP/no-such-teacher")),
    ("build", "--teacher: a directory without a model", _replace(build(), "--teacher", "$TMP/tokenizer-only")),
    ("build", "--teacher: a file", _replace(build(), "--teacher", "$TMP/text.txt")),
    ("build", "--data: no such file", _replace(build(), "--data", "$TMP/missing.jsonl")),
    ("build", "--data: a file type it does not read (.csv)", _replace(build(), "--data", "$TMP/notes.csv")),
    ("build", "--data: .jsonl that is not JSON", _replace(build(), "--data", "$TMP/bad.jsonl")),
    ("build", "--data: only empty documents", _replace(build(), "--data", "$TMP/empty.jsonl")),
    ("build", "--data: a parquet file without the text column", _replace(build(), "--data", "$TMP/no-text.parquet")),
    ("build", "--data: a shard given as data", _replace(build(), "--data", "$TMP/good/shards/part-r000-00000.arrow")),
    ("build", "--text-field: a column the data does not have", build("--text-field", "body")),
    ("build", "--out: an existing file", build(out="$TMP/text.txt")),
    ("build", "--out: a directory that is not empty", build(out="$TMP/good")),
    ("build", "--resume on a complete cache", build("--resume", out="$TMP/good")),
    ("build", "--seq-len 0", _replace(build(), "--seq-len", "0")),
    ("build", "--seq-len beyond the teacher's positions", _replace(build(), "--seq-len", "100000")),
    ("build", "--seq-len not a number", _replace(build(), "--seq-len", "long")),
    ("build", "--batch-size 0", build("--batch-size", "0")),
    ("build", "--k 0", _replace(build(), "--k", "0")),
    ("build", "--k beyond the vocabulary", _replace(build(), "--k", "9000")),
    ("build", "--target nucleus --top-p 1.5", build("--target", "nucleus", "--top-p", "1.5")),
    ("build", "--target nucleus --min-k 10 --max-k 5", build("--target", "nucleus", "--min-k", "10", "--max-k", "5")),
    ("build", "--target sample --samples 0", build("--target", "sample", "--samples", "0")),
    ("build", "--target beam", build("--target", "beam")),
    ("build", "--temperature 0", build("--temperature", "0")),
    ("build", "--temperature -1", build("--temperature", "-1")),
    ("build", "--temperature inf", build("--temperature", "inf")),
    ("build", "--shard-mb nan", build("--shard-mb", "nan")),
    ("build", "--hidden-layers 2,2", build("--hidden-layers", "2,2")),
    ("build", "--resume and --overwrite together", build("--resume", "--overwrite")),
    ("build", "--out inside --data", _replace(build(out="$TMP/datadir/cache"), "--data", "$TMP/datadir")),
    ("build", "--hidden-layers not numbers", build("--hidden-layers", "a,b")),
    ("build", "--hidden-layers beyond the teacher's layers", build("--hidden-layers", "99")),
    ("build", "--hidden-dtype float8", build("--hidden-dtype", "float8")),
    ("build", "--dtype fp8", build("--dtype", "fp8")),
    ("build", "--device tpu", build("--device", "tpu")),
    ("build", "--device cuda without a GPU", build("--device", "cuda")),
    ("build", "--packing zip", build("--packing", "zip")),
    ("build", "--max-docs 0", _replace(build(), "--max-docs", "0")),
    ("build", "--shard-mb 0", build("--shard-mb", "0")),
    ("build", "--zstd-level 99", build("--zstd-level", "99")),
    ("build", "no --teacher", [a for a in build() if a not in ("--teacher", TEACHER)]),
    ("build", "another build is writing into --out", build("--resume", out="$TMP/locked")),
    ("build", "--slice 3/3", build("--slice", "3/3")),
    ("build", "--slice not i/n", build("--slice", "half")),
    ("build", "--estimate-rows 0", build("--estimate", "--estimate-rows", "0")),
    ("build", "--out: a URL of a protocol fsspec does not know", build(out="nosuch://bucket/cache")),
    ("train", "--cache: no such directory", _replace(train(), "--cache", "$TMP/no-such-cache")),
    ("train", "--cache: a directory that is not a cache", _replace(train(), "--cache", "$TMP/empty-dir")),
    ("train", "--cache: a build that did not finish", _replace(train(), "--cache", "$TMP/incomplete")),
    ("train", "--cache: a cache from a newer format version", _replace(train(), "--cache", "$TMP/newer")),
    ("train", "--cache: a damaged shard", _replace(train(), "--cache", "$TMP/damaged")),
    ("train", "--student: no such file, directory or preset", _replace(train(), "--student", "llama-huge")),
    ("train", "--student: a config whose vocabulary is smaller than the cache's",
     _replace(train(), "--student", "$TMP/small-vocab.json")),
    ("train", "--student: a config without model_type", _replace(train(), "--student", "$TMP/no-type.json")),
    ("train", "--student: a model with another tokenizer", _replace(train(), "--student", "$TMP/other-tokenizer")),
    ("train", "--student: padded vocabulary (8192 ids in the cache, 8256 outputs): accepted",
     _replace(train(), "--student", "$TMP/padded.json")),
    ("train", "--out: not empty, without --resume", train(out="$TMP/good")),
    ("train", "--steps 0", _replace(train(), "--steps", "0")),
    ("train", "--batch-size 0", _replace(train(), "--batch-size", "0")),
    ("train", "--grad-accum 0", train("--grad-accum", "0")),
    ("train", "--lr -1", train("--lr", "-1")),
    ("train", "--warmup-steps -1", train("--warmup-steps", "-1")),
    ("train", "--kd-loss bogus", train("--kd-loss", "bogus")),
    ("train", "--kd-loss sampled_ce on a top-k cache", train("--kd-loss", "sampled_ce")),
    ("train", "--tail bogus", train("--tail", "bogus")),
    ("train", "--temperature 0", train("--temperature", "0")),
    ("train", "--beta 2", train("--kd-loss", "jsd", "--beta", "2")),
    ("train", "--temperature inf", train("--temperature", "inf")),
    ("train", "--lr nan", train("--lr", "nan")),
    ("train", "--kd-alpha -1", train("--kd-alpha", "-1")),
    ("train", "--out: a model directory", train(out="$TMP/other-tokenizer")),
    ("train", "--resume of a complete run", train("--resume", out="$TMP/done-run")),
    ("train", "a diverging run (--lr 1e20): non-finite gradient at step 2",
     _replace(train("--lr", "1e20", "--warmup-steps", "0"), "--steps", "3")),
    ("train", "--hint-layers not pairs", train("--hint-layers", "x")),
    ("train", "--hint-layers on a cache without hidden states", train("--hint-layers", "1:2")),
    ("train", "--chunk-size 0 with --fused-head", train("--fused-head", "--chunk-size", "0")),
    ("train", "--eval-data: no such file", train("--eval-data", "$TMP/missing.jsonl")),
    ("train", "--checkpoint-every -1", train("--checkpoint-every", "-1")),
    ("train", "--num-workers -1", train("--num-workers", "-1")),
    ("train", "--online-teacher: no such directory", train("--online-teacher", "$TMP/no-such-teacher")),
    ("train", "--device cuda without a GPU", train("--device", "cuda")),
    ("train", "--cross-tokenizer uld without --ce-alpha",
     _replace(train("--cross-tokenizer", "uld", "--ce-alpha", "0"), "--student", "$TMP/other-tokenizer")),
    ("train", "--cross-tokenizer bogus", train("--cross-tokenizer", "bogus")),
    ("merge", "PART: a cache built without --slice", ["merge", "$TMP/good", "--out", "$OUT"]),
    ("merge", "PART: no such directory", ["merge", "$TMP/no-such-cache", "--out", "$OUT"]),
    ("merge", "PART at a URL, --out a local directory, without --copy",
     ["merge", "s3://bucket/c-0", "s3://bucket/c-1", "--out", "$OUT"]),
    ("inspect", "CACHE: no such directory", ["inspect", "$TMP/no-such-cache"]),
    ("inspect", "CACHE: a file", ["inspect", "$TMP/text.txt"]),
    ("inspect", "CACHE: a directory that is not a cache", ["inspect", "$TMP/empty-dir"]),
    ("inspect", "CACHE: a cache from a newer format version", ["inspect", "$TMP/newer"]),
    ("inspect", "CACHE: a damaged shard", ["inspect", "$TMP/damaged"]),
    ("inspect", "CACHE: a manifest that is not JSON", ["inspect", "$TMP/bad-manifest"]),
    ("inspect", "CACHE: a manifest naming a shard outside the cache", ["inspect", "$TMP/escape"]),
    ("inspect", "--sample-batches -1", ["inspect", "$TMP/good", "--sample-batches", "-1"]),
    ("inspect", "--sample-batches not a number", ["inspect", "$TMP/good", "--sample-batches", "all"]),
    ("verify", "CACHE: no such directory", ["verify", "$TMP/no-such-cache"]),
    ("verify", "CACHE: a file", ["verify", "$TMP/text.txt"]),
    ("verify", "CACHE: a build that did not finish", ["verify", "$TMP/incomplete"]),
    ("verify", "CACHE: a cache from a newer format version", ["verify", "$TMP/newer"]),
    ("verify", "CACHE: a cache from an older format version", ["verify", "$TMP/older"]),
    ("verify", "CACHE: a shard from a newer format version", ["verify", "$TMP/newer-shard"]),
    ("verify", "CACHE: a damaged shard", ["verify", "$TMP/damaged"]),
    ("verify", "CACHE: a truncated shard", ["verify", "$TMP/truncated"]),
    ("verify", "CACHE: a manifest with an unknown field", ["verify", "$TMP/unknown-field"]),
    ("verify", "CACHE: a manifest naming a shard outside the cache", ["verify", "$TMP/escape"]),
    ("verify", "--deep on a damaged shard", ["verify", "$TMP/damaged", "--deep"]),
]


def prepare_light(tmp: Path) -> None:
    """The inputs that need no build: text files, an empty directory, a manifest of a newer version."""
    (tmp / "text.txt").write_text("hello\n")
    (tmp / "notes.csv").write_text("text\nhello\n")
    (tmp / "bad.jsonl").write_text("this is not json\n")
    (tmp / "empty.jsonl").write_text('{"text": ""}\n')
    (tmp / "empty-dir").mkdir()
    (tmp / "datadir").mkdir()
    (tmp / "datadir" / "a.jsonl").write_text('{"text": "hello"}\n')
    (tmp / "locked" / "state").mkdir(parents=True)


def prepare(tmp: Path) -> None:
    """The files the entries point at."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from teachercache.format import schema as S

    prepare_light(tmp)
    proc = subprocess.run([sys.executable, "-m", "teachercache", *build(out=str(tmp / "good"))], env=ENV,
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    pq.write_table(pa.table({"body": ["hello world"]}), tmp / "no-text.parquet")
    shutil.copytree(ROOT / TEACHER, tmp / "tokenizer-only", ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    manifest = json.loads((tmp / "good" / "manifest.json").read_text())

    def variant(name, edit=None, shard=None):
        shutil.copytree(tmp / "good", tmp / name)
        raw = json.loads(json.dumps(manifest))
        if edit:
            edit(raw)
            (tmp / name / "manifest.json").write_text(json.dumps(raw))
        if shard:
            p = tmp / name / manifest["shards"][0]["file"]
            p.write_bytes(shard(p.read_bytes()))

    variant("newer", lambda r: r.update(format_version=S.FORMAT_VERSION + 1))
    variant("older", lambda r: r.update(format_version=S.FORMAT_VERSION - 1))
    variant("unknown-field", lambda r: r.update(comment="hand edited"))
    variant("escape", lambda r: r["shards"][0].update(file="../outside.arrow"))
    variant("damaged", shard=lambda b: b[:len(b) // 2] + bytes([b[len(b) // 2] ^ 1]) + b[len(b) // 2 + 1:])
    variant("truncated", shard=lambda b: b[:-100])
    variant("newer-shard")  # the shard rewritten with the next format version in its schema, the manifest resealed
    import hashlib

    import pyarrow.ipc as ipc

    raw = json.loads((tmp / "newer-shard" / "manifest.json").read_text())
    p = tmp / "newer-shard" / raw["shards"][0]["file"]
    table = ipc.open_stream(pa.memory_map(str(p))).read_all()
    table = table.replace_schema_metadata({**table.schema.metadata, b"teachercache.format_version": str(S.FORMAT_VERSION + 1).encode()})
    with ipc.new_stream(str(p), table.schema) as writer:
        writer.write_table(table)
    raw["shards"][0].update(sha256=hashlib.sha256(p.read_bytes()).hexdigest(), bytes=p.stat().st_size)
    raw["totals"]["bytes"] = sum(s["bytes"] for s in raw["shards"])
    (tmp / "newer-shard" / "manifest.json").write_text(json.dumps(raw))
    shutil.copytree(tmp / "good", tmp / "bad-manifest")
    (tmp / "bad-manifest" / "manifest.json").write_text("{not json")
    shutil.copytree(tmp / "good", tmp / "incomplete")
    (tmp / "incomplete" / "manifest.json").unlink()
    cfg = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 2}
    (tmp / "small-vocab.json").write_text(json.dumps({**cfg, "vocab_size": 4000}))
    (tmp / "padded.json").write_text(json.dumps({**cfg, "vocab_size": 8256}))
    (tmp / "no-type.json").write_text(json.dumps({"hidden_size": 32}))
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(ROOT / TEACHER)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(tmp / "other-tokenizer")
    LlamaForCausalLM(LlamaConfig(**{**cfg, "vocab_size": len(tok)})).save_pretrained(tmp / "other-tokenizer")
    done = [a.replace("$TMP", str(tmp)) for a in train(out=str(tmp / "done-run"))]
    subprocess.run([sys.executable, "-m", "teachercache", *done], env=ENV, check=True, capture_output=True)


def run_entry(args: list[str], tmp: Path, out: Path | None = None) -> tuple[int, str]:
    """(exit code, last line of output with the scratch path as $TMP) of one entry; ``out`` (an unused
    directory of its own) stands for $OUT."""
    out = out or Path(tempfile.mkdtemp(dir=tmp, prefix="out-")) / "out"
    argv = [a.replace("$OUT", str(out)).replace("$TMP", str(tmp)) for a in args]
    proc = subprocess.run([sys.executable, "-m", "teachercache", *argv], env=ENV, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in (proc.stderr + "\n" + proc.stdout).splitlines() if line.strip()
             and not line.startswith(("Loading weights", "Writing model"))]
    error = [line for line in lines if line.startswith(("Error", "FAULT", "Traceback"))]
    if any(line.startswith("Traceback") for line in lines):
        text = "TRACEBACK: " + lines[-1]
    elif error:
        text = " / ".join(error)
    else:
        text = lines[-1] if lines else ""
    return proc.returncode, text.replace(str(out), "$OUT").replace(str(tmp), "$TMP").replace(str(ROOT) + "/", "")


def hold_lock(tmp: Path):
    """The "another build" entry needs a lock that is held: this process holds it meanwhile."""
    import fcntl

    f = open(tmp / "locked" / "state" / "rank-000.lock", "w")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def run_all(tmp: Path, entries=ENTRIES, jobs: int = 2) -> list[tuple[str, str, list[str], int, str]]:
    held = hold_lock(tmp)
    try:
        with ThreadPoolExecutor(jobs) as pool:
            results = list(pool.map(lambda e: run_entry(e[2], tmp), entries))
    finally:
        held.close()
    return [(s, what, args, code, text) for (s, what, args), (code, text) in zip(entries, results)]


def render(results) -> str:
    out = ["# Errors: bad inputs and the exact message each gets", "",
           "Generated by `python tools/errors_catalogue.py` from the real commands (`python -m teachercache ...`",
           "in a scratch directory, written `$TMP`); `tests/test_errors_catalogue.py` re-runs some entries and",
           "checks they still match. Exit code 1: a teachercache error (one line, no traceback); 2: click refused",
           "the option before anything ran; 0: accepted. Commands start from",
           f"`teachercache {' '.join(BUILD)} --out $OUT` (build) and",
           f"`teachercache {' '.join(TRAIN)} --out $OUT` (train), with the one change named; `$OUT` is a",
           "directory that does not exist yet.", ""]
    for section in dict.fromkeys(s for s, *_ in results):
        out += [f"## {section}", "", "| input | exit | message |", "| --- | ---: | --- |"]
        for s, what, args, code, text in results:
            if s == section:
                out.append(f"| {what} | {code} | {_cell(text)} |")
        out.append("")
    return "\n".join(out)


def _cell(text: str) -> str:
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`" if text else ""


def _uncell(cell: str) -> str:
    return cell[1:-1].replace("\\|", "|") if cell.startswith("`") else cell


def parse_page(text: str) -> dict[tuple[str, str], tuple[int, str]]:
    """{(section, input): (exit, message)} from a rendered page."""
    table, section = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:]
        elif line.startswith("| ") and not line.startswith(("| input", "| ---")):
            what, code, message = [c.strip() for c in line.strip("|").split(" | ", 2)]
            table[(section, what)] = (int(code), message)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with docs/ERRORS.md instead of writing it")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default=None,
                        help="re-run only the entries whose 'section: input' matches this regex; keep the rest")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tc-errors-"))
    try:
        prepare(tmp)
        chosen = [e for e in ENTRIES if args.only is None or re.search(args.only, f"{e[0]}: {e[1]}")]
        fresh = {(s, what): (code, text) for s, what, _, code, text in run_all(tmp, chosen, jobs=args.jobs)}
        old = parse_page(PAGE.read_text()) if args.only and PAGE.exists() else {}
        results = []
        for s, what, argv in ENTRIES:
            code, text = fresh.get((s, what)) or (old[(s, what)][0], _uncell(old[(s, what)][1]))
            results.append((s, what, argv, code, text))
        page = render(results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.check:
        same = PAGE.read_text() == page + "\n"
        print("docs/ERRORS.md is up to date" if same else "docs/ERRORS.md differs from the commands")
        sys.exit(0 if same else 1)
    PAGE.write_text(page + "\n")
    print(f"wrote {PAGE.relative_to(ROOT)}: {len(ENTRIES)} entries")


if __name__ == "__main__":
    main()
