"""Issue 18's hostile and careless inputs as reproducible cases (``python tools/faults.py --only hostile``).

Each case prepares a directory, runs one real ``teachercache`` command with stdin closed, and checks what
RELIABILITY.md promises: the expected exit code, a message naming the problem (a regular expression on
stderr and stdout), no traceback, no prompt (a timeout), and nothing deleted or mixed: every path the case protects
has the same files and bytes afterwards.
"""

from __future__ import annotations

import fcntl
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "data" / "teacher"


@dataclass
class Prepared:
    args: list
    protect: list = field(default_factory=list)
    hold: object = None          # an open file whose lock the harness holds while the command runs


@dataclass
class Case:
    item: int
    name: str
    prepare: Callable[[Path, Path], Prepared]
    expect: str
    exit_codes: tuple = (1, 2)
    clean_output: bool = False   # also refuse a raw escape character in what the command printed


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "teachercache", *map(str, args)]


def snapshot(path: Path) -> dict:
    if path.is_file():
        return {"": path.read_bytes()}
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _train(cache, out, *flags) -> list:
    return cli("train", "--cache", cache, "--student", "llama-tiny", "--out", out, "--steps", 2, "--batch-size", 2,
               "--no-progress", *flags)


def _copy(ref: Path, dst: Path) -> Path:
    shutil.copytree(ref, dst)
    return dst


def _finished_run(work: Path, cache: Path, killed: bool = False) -> Path:
    """A real training run in work/run (2 steps, checkpoints every step); ``killed``: without its final save."""
    out = work / "run"
    subprocess.run(_train(cache, out, "--checkpoint-every", 1), check=True, capture_output=True)
    if killed:
        for name in ("training_summary.json", "model.safetensors", "config.json"):
            (out / name).unlink(missing_ok=True)
    return out


def _export_into_source(work, ref):
    cache = _copy(ref, work / "victim")
    return Prepared(cli("export", cache, "--out", cache, "--overwrite"), [cache])


def _export_over_project(work, ref):
    project = work / "proj"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')\n")
    return Prepared(cli("export", ref, "--out", project, "--overwrite"), [project, ref])


def _resume_teacher_copy(work, ref):
    copy = _copy(TEACHER, work / "t3")
    return Prepared(_train(ref, copy, "--resume"), [copy])


def _resume_complete_run(work, ref):
    out = _finished_run(work, ref)
    return Prepared(_train(ref, out, "--resume", "--checkpoint-every", 1), [out])


def _resume_other_options(work, ref):
    out = _finished_run(work, ref, killed=True)
    return Prepared(_train(ref, out, "--resume", "--checkpoint-every", 1, "--kd-loss", "reverse_kl", "--lr", "0.01"),
                    [out])


def _second_run(work, ref):
    out = _finished_run(work, ref, killed=True)
    lock = open(out / ".teachercache.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)       # as a running train holds it
    return Prepared(_train(ref, out, "--resume", "--checkpoint-every", 1), [out], hold=lock)


def _flag(command, flag, value):
    """A case's preparation: ``command`` (train or build into the case's directory, or eval of the demo
    teacher on the reference cache) with one extra flag."""
    def prepare(work, ref):
        args = {"train": lambda: _train(ref, work / "out", flag, value),
                "build": lambda: _build(work / "out", flag, value),
                "eval": lambda: cli("eval", "--model", TEACHER, "--data", ref, flag, value)}[command]()
        return Prepared(args, [work, ref])
    return prepare


def _unwritable_out(work, ref):
    return Prepared(_train(ref, "/sys/teachercache-hostile"), [])


def _edit_manifest(cache: Path, edit) -> None:
    path = cache / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def _code_in_tokenizer(work, ref):
    """The cache's tokenizer_config.json names custom code (auto_map) that, imported, would write a file."""
    cache = _copy(ref, work / "cache")
    tok = cache / "tokenizer"
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "tokenizer_evil.EvilTokenizer"]})
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    (tok / "tokenizer_evil.py").write_text(f"open({str(work / 'ran')!r}, 'w').write('ran')\n"
                                           "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    return Prepared(cli("show", cache, "--row", 0), [cache, work / "ran"])


def _deep_manifest(work, ref):
    cache = _copy(ref, work / "cache")
    text = (cache / "manifest.json").read_text()
    (cache / "manifest.json").write_text(text[:-1].rstrip().rstrip("}") + ', "extra": ' + "[" * 100_000
                                         + "]" * 100_000 + "}")
    return Prepared(cli("verify", cache), [cache])


def _replaced_tokenizer(work, ref):
    """Two tokens' ids swapped in the cache's tokenizer.json: same size, other tokens."""
    cache = _copy(ref, work / "cache")
    path = cache / "tokenizer" / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(spec))
    return Prepared(cli("verify", cache, "--deep"), [cache])


def _linked_tokenizer_file(work, ref):
    cache = _copy(ref, work / "cache")
    outside = work / "elsewhere.json"
    shutil.move(cache / "tokenizer" / "tokenizer.json", outside)
    (cache / "tokenizer" / "tokenizer.json").symlink_to(outside)
    return Prepared(cli("verify", cache), [cache, outside])


def _resealed_vocab(work, ref):
    cache = _copy(ref, work / "cache")

    def reseal(raw):
        raw["layout"]["vocab_size"] = raw["tokenizer"]["vocab_size"] = raw["teacher"]["output_size"] = 1 << 24
    _edit_manifest(cache, reseal)
    return Prepared(_train(cache, work / "out"), [cache])


def _hidden_twice(work, ref):
    cache = _copy(ref, work / "cache")
    _edit_manifest(cache, lambda raw: raw["layout"].update(hidden_layers=[2, 2], hidden_width=64))
    return Prepared(cli("inspect", cache), [cache])


CORPUS = ROOT / "data" / "corpus" / "valid.parquet"


def _build(out, *flags, data=CORPUS, docs=1) -> list:
    return cli("build", "--teacher", TEACHER, "--data", data, "--out", out, "--seq-len", 32, "--max-docs", docs,
               "--batch-size", 4, "--k", 16, "--no-progress", *flags)


def _resume_other_k(work, ref):
    """A build killed after its last shard (no manifest yet), resumed with another --k."""
    cache = _copy(ref, work / "cache")
    (cache / "manifest.json").unlink()
    return Prepared(_build(cache, "--resume", "--k", 4), [cache])


def _bad_records(work, ref):
    data = work / "data.jsonl"
    good = [json.dumps({"text": "def f(x):\n    return x + 1\n" * 20})] * 40
    data.write_text("\n".join(good[:20] + ['{"text": "\\ud83d lone"}', "[" * 100_000 + "]" * 100_000] + good[20:])
                    + "\n")
    return Prepared(_build(work / "out", "--max-bad-records", 2, data=data, docs=100), [data])


def _data_dir_inputs(work, ref):
    import gzip

    folder = work / "data"
    folder.mkdir()
    text = json.dumps({"text": "x = 1\n" * 50}) + "\n"
    with gzip.open(folder / "a.JSONL.gz", "wt") as f:
        f.write(text)
    (folder / "notes.csv").write_text("a,b\n1,2\n")
    return Prepared(_build(work / "out", data=folder), [folder])


def _out_inside_data(work, ref):
    folder = work / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"text": "x = 1\n" * 50}) + "\n")
    return Prepared(_build(folder / "cache", data=folder), [folder])


def _build_over_project(work, ref):
    project = work / "proj"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')\n")
    return Prepared(_build(project, "--overwrite"), [project])


def _escapes_in_text(work, ref):
    """A corpus line holding terminal escape sequences (clear the screen, retitle the window), then show."""
    data = work / "evil.jsonl"
    data.write_text(json.dumps({"text": "print('hi')\x1b[2J\x1b]0;pwned\x07 and more text " * 8}) + "\n")
    subprocess.run(_build(work / "cache", data=data), check=True, capture_output=True)
    return Prepared(cli("show", work / "cache", "--row", 0), [work / "cache"])


def _eval_text_seq_len(work, ref):
    return Prepared(cli("eval", "--model", TEACHER, "--data", CORPUS, "--seq-len", 100_000, "--max-rows", 1), [])


CASES = [
    Case(1, "export --out its own cache --overwrite", _export_into_source,
         r"would be written into \(or over\) its own source cache"),
    Case(1, "export --overwrite over a project directory", _export_over_project,
         r"a directory, not an exported parquet file"),
    Case(2, "train --resume into a copy of a model directory", _resume_teacher_copy,
         r"not a teachercache training run but a model directory"),
    Case(2, "train --resume of a complete run (left as it is)", _resume_complete_run,
         r"the run is already complete \(2 steps, .*nothing to resume", (0,)),
    Case(6, "train --resume with another --kd-loss and --lr", _resume_other_options,
         r"--resume with other options than the run it continues: kd.loss: None -> 'reverse_kl'; "
         r"schedule.lr: 0.001 -> 0.01"),
    Case(10, "train into a run whose lock another process holds", _second_run,
         r"another training run is writing into this directory"),
    Case(7, "train --lr inf", _flag("train", "--lr", "inf"), r"lr \(--lr\) must be a finite number"),
    Case(7, "train --kd-alpha nan", _flag("train", "--kd-alpha", "nan"),
         r"kd_weight \(--kd-alpha\) must be a finite number"),
    Case(7, "train --kd-alpha -1", _flag("train", "--kd-alpha", "-1"),
         r"kd_weight \(--kd-alpha\) must be a finite number"),
    Case(7, "train --max-grad-norm nan", _flag("train", "--max-grad-norm", "nan"),
         r"max_grad_norm .* must be a finite number"),
    Case(13, "train into an unwritable --out", _unwritable_out, r"cannot write there"),
    Case(4, "show a cache whose tokenizer names custom code", _code_in_tokenizer,
         r"names custom tokenizer code \(field auto_map: .*which teachercache never runs"),
    Case(12, "verify a manifest nested 100,000 levels deep", _deep_manifest,
         r"JSON nested deeper than the limit of 64 levels"),
    Case(12, "verify --deep a cache whose tokenizer was replaced", _replaced_tokenizer,
         r"the tokenizer's fingerprint \w+ differs from the manifest's tokenizer.fingerprint"),
    Case(12, "verify a cache with a symlink in tokenizer/", _linked_tokenizer_file, r"is a symbolic link"),
    Case(12, "train on a manifest resealed to a 2^24 vocabulary", _resealed_vocab,
         r"layout.vocab_size: 16777216 is beyond the limit of \d+ \(the files of tokenizer/ hold"),
    Case(9, "inspect a cache whose manifest lists hidden layer 2 twice", _hidden_twice, r"layer 2 is listed twice"),
    Case(13, "show a row whose text holds terminal escape sequences", _escapes_in_text,
         r"print\('hi'\)\\x1b\[2J\\x1b\]0;pwned\\x07", (0,), clean_output=True),
    Case(3, "build --resume with another --k", _resume_other_k,
         r"--resume with other options than the run it continues: .*targets.k: 16 -> 4"),
    Case(5, "build over records with a lone surrogate and 100,000 levels of nesting", _bad_records,
         r"2 bad records skipped.*skipped.jsonl", (0,)),
    Case(8, "build a data directory with a .JSONL.gz and a .csv", _data_dir_inputs, r"ignored", (0,)),
    Case(8, "build --out inside --data", _out_inside_data, r"lies inside --data"),
    Case(1, "build --overwrite over a project directory", _build_over_project, r"not a teachercache cache"),
    Case(7, "build --temperature inf", _flag("build", "--temperature", "inf"), r"not a finite number"),
    Case(7, "build --shard-mb nan", _flag("build", "--shard-mb", "nan"), r"not a finite number"),
    Case(9, "build --hidden-layers 2,2", _flag("build", "--hidden-layers", "2,2"), r"layer 2 is given twice"),
    Case(11, "eval --batch-size 0", _flag("eval", "--batch-size", 0), r"Invalid value for '--batch-size'"),
    Case(11, "eval of a text file with --seq-len beyond the model's positions", _eval_text_seq_len,
         r"--seq-len 100000 exceeds the model's max_position_embeddings"),
]


def run_case(case: Case, work: Path, ref: Path, env: dict) -> dict:
    """Prepare, snapshot, run (stdin closed, 300 s limit), compare; one result record."""
    work.mkdir(parents=True, exist_ok=True)
    prepared = case.prepare(work, ref)
    before = {str(p): snapshot(Path(p)) for p in prepared.protect}
    try:
        proc = subprocess.run(prepared.args, env=env, capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL, cwd=ROOT)
        code, stderr, output = proc.returncode, proc.stderr, proc.stderr + proc.stdout
    except subprocess.TimeoutExpired:
        code, stderr, output = None, "", "timed out (a prompt?)"
    finally:
        if prepared.hold is not None:
            prepared.hold.close()
    changed = [p for p, snap in before.items() if snapshot(Path(p)) != snap]
    problems = []
    if code not in case.exit_codes:
        problems.append(f"exit {code}")
    if "Traceback" in stderr:
        problems.append("traceback")
    if not re.search(case.expect, output):
        problems.append("message")
    if changed:
        problems.append("changed " + ", ".join(changed))
    if case.clean_output and "\x1b" in output:
        problems.append("raw escape sequence printed")
    lines = [line for line in output.strip().splitlines() if not line.startswith("Loading weights")]
    last = next((line for line in lines if re.search(case.expect, line)), lines[-1] if lines else "")
    return {"item": case.item, "case": case.name, "exit": code, "ok": not problems, "problems": problems,
            "message": last[:400]}


def hostile(work: Path, ref: Path, env: dict, quick: bool = False) -> dict:
    """Every case of CASES (``quick``: the first case of each issue item); the counts and each case's record."""
    results = []
    seen = set()
    for i, case in enumerate(CASES):
        if quick and case.item in seen:
            continue
        seen.add(case.item)
        results.append(run_case(case, work / f"hostile-{i:02d}", ref, env))
        print(json.dumps(results[-1]), flush=True)
    return {"cases": len(results), "ok": sum(r["ok"] for r in results), "results": results}
