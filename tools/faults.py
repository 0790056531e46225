"""The reliability campaign of issue 9: kills, corrupted files, a full disk, two builds at once.

    python tools/faults.py            # the full campaign (RELIABILITY.md has its figures; ~15 min on 2 cores)
    python tools/faults.py --quick    # a few of each (tests/test_faults.py runs it)

Sections (``--only build,train,fuzz,disk,lock,hostile`` runs some of them):

* build: ``python -m teachercache build`` of the demo teacher over a slice of data/corpus/valid.parquet,
  small shards, SIGKILLed at moments drawn uniformly (seeded) over the measured length of an
  uninterrupted build (start to exit: imports and the teacher load take much of it), then a few more
  uniform over its pass alone (so that kills land inside shards and on the manifest too); each is
  ``--resume``d and must have the same shards (names and SHA-256 in the manifest), decode to the same
  values as the uninterrupted build, and verify --deep clean.
* s3 (``--only s3``, not in the default set; needs moto[server] and s3fs, the dev extra): the build case with
  the cache on an S3 endpoint (moto's server on 127.0.0.1, tools/local_s3.py): the same build into s3://, killed
  at moments uniform over the uninterrupted remote build and over its pass (timed from its staging directory's
  tokenizer/, teacher/remote_build.py), each ``--resume``d and held to the same assertions, against the
  uninterrupted remote build, which must itself have the local reference's shards.
* train: ``python -m teachercache train`` on that cache with a checkpoint every 2 steps, killed the same
  way (uniform over the whole run, then over its training loop alone) and resumed; the final model.safetensors must equal an uninterrupted run's (max |diff| <= 1e-6).
* fuzz: corrupted shards and manifests (tools/fault_fuzz.py) read by the reader, verify and verify --deep
  in worker processes with a timeout; crashes, hangs, silent wrong values and errors that do not name
  the file are counted.
* disk: a build into a 2 MiB tmpfs nearly filled by a ballast file must stop with an error naming the
  directory and saying the disk is full; after the ballast is deleted, ``--resume`` completes, verifies
  and equals the uninterrupted build. Needs root (mount); skipped, and said so, without it.
* lock: two builds started together into one directory (one must be refused, the other's cache equals
  the uninterrupted build), and ``--resume``/``--overwrite`` builds started while one runs (refused,
  nothing of the running build touched).
* hostile: issue 18's careless and hostile inputs (tools/hostile_inputs.py), each a real command with
  stdin closed: refused with a clear message, no traceback, nothing deleted or mixed.

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
TEACHER = ROOT / "data" / "teacher"
CORPUS = ROOT / "data" / "corpus" / "valid.parquet"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}

import fault_fuzz  # noqa: E402  (tools/ on the path)
import hostile_inputs  # noqa: E402


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "teachercache", *map(str, args)]


def build_args(out, docs: int) -> list[str]:
    return cli("build", "--teacher", TEACHER, "--data", CORPUS, "--out", out, "--seq-len", 128, "--max-docs", docs,
               "--batch-size", 4, "--k", 16, "--shard-mb", 0.03, "--no-progress")


def train_args(cache, out, steps: int) -> list[str]:
    return cli("train", "--cache", cache, "--student", "llama-tiny", "--out", out, "--steps", steps,
               "--batch-size", 4, "--checkpoint-every", 2, "--warmup-steps", 2, "--seed", 3, "--no-progress")


def run(args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def kill_at(args, seconds: float, after: Path | None = None) -> bool:
    """Start ``args``, SIGKILL it ``seconds`` later (counted from when ``after`` appears, if given: the
    start of a build's pass, whatever the load on the machine made of its start-up); False if it had
    already finished by then."""
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    while after is not None and not after.exists() and proc.poll() is None:
        time.sleep(0.005)
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def shard_table(cache) -> list:
    if "://" in str(cache):  # a cache at a URL (the s3 section)
        from teachercache.format.cache import Cache

        return [(s.file, s.sha256, s.rows, s.tokens, s.target_entries)
                for s in Cache.open(cache, verify_checksums=False).shards]
    m = json.loads((Path(cache) / "manifest.json").read_text())
    return [(s["file"], s["sha256"], s["rows"], s["tokens"], s["target_entries"]) for s in m["shards"]]


def ordered_digest(cache) -> str:
    """SHA-256 of every decoded value, in reading order."""
    import hashlib

    from teachercache.format.cache import Cache

    h = hashlib.sha256()
    for batch in Cache.open(cache).iter_batches():
        fault_fuzz.batch_digest(h, batch)
    return h.hexdigest()


def same_cache(cache, ref) -> tuple[bool, str]:
    from teachercache.format.cache import is_cache
    from teachercache.inspect.verify import verify_cache

    if not is_cache(cache):
        return False, "no manifest"
    if shard_table(cache) != shard_table(ref):
        return False, "shards differ"
    if ordered_digest(cache) != ordered_digest(ref):
        return False, "decoded values differ"
    faults = verify_cache(cache, deep=True)
    return (not faults), (str(faults[0]) if faults else "identical")


# ---------------------------------------------------------------------------------------------------
# Kills.


def build_phase(out: Path) -> str:
    """Where a killed build was, from what it left on disk."""
    state = out / "state" / "rank-000.json"
    if (out / "manifest.json").exists():
        return "after the manifest (exiting)"
    if list(out.glob("manifest.json.partial-*")):
        return "writing the manifest"
    done = len(json.loads(state.read_text())["shards"]) if state.exists() else 0
    partial = list((out / "shards").glob("*.partial-*")) if (out / "shards").is_dir() else []
    if not (out / "tokenizer").is_dir():
        return "starting (imports, teacher load)"
    if partial:
        return "inside a shard (forward/encode/write)"
    return "between shards" if done else "first forward passes"


def timed_run(args, marker: Path) -> tuple[float, float]:
    """Run to completion: (seconds in all, seconds until ``marker`` appeared: a build's tokenizer/, the
    start of its pass; a training run's metrics.jsonl, the start of its loop)."""
    t0 = time.time()
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    pass_start = None
    while proc.poll() is None:
        if pass_start is None and marker.exists():
            pass_start = time.time() - t0
        time.sleep(0.01)
    if proc.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed:\n{proc.stderr.read()[-3000:]}")
    return time.time() - t0, pass_start or 0.0


def kill_campaign(work: Path, name: str, args_for, marker: str, duration: float, rounds, phase_of, check,
                  rng: random.Random, report: dict, after_of=None) -> None:
    """Kill runs of ``args_for(out)`` at random moments, resume each with ``--resume`` and ``check`` it.

    ``rounds``: (label, count, lo) — ``count`` kills landed at moments uniform over [lo, duration), timed
    from when the run's ``marker`` file appears if lo > 0 (else from its start); a run that finishes before
    its kill is not counted and another moment is drawn. ``phase_of(out)`` names what the run was doing;
    ``check(out, phase, proc)`` judges the resumed run: (ok, text to print, why it failed). Per label the
    report gets the kills landed, how many were identical, the phases and the failures. ``after_of(out)``: the
    file whose appearance times a kill, where it is not ``out / marker``."""
    for label, count, lo in rounds:
        phases, failures, landed, attempts = Counter(), [], 0, 0
        while landed < count and attempts < 3 * count:
            attempts += 1
            out = work / f"{name}-kill-{label}-{attempts}"
            moment = rng.uniform(lo, duration)
            after = (after_of(out) if after_of is not None else out / marker) if lo else None
            if not kill_at(args_for(out), moment - lo, after=after):
                shutil.rmtree(out, ignore_errors=True)
                continue  # finished before the kill: not counted, draw again
            landed += 1
            phase = phase_of(out)
            phases[phase] += 1
            ok, shown, why = check(out, phase, run(args_for(out) + ["--resume"]))
            if not ok:
                failures.append({"moment": round(moment, 2), "phase": phase, "why": why})
            print(f"[{name}] {label[:-1].replace('_', ' ')} {landed:2d} at {moment:5.2f} s ({phase}): {shown}")
            shutil.rmtree(out, ignore_errors=True)
        report[label] = landed
        report[f"{label}_identical"] = landed - len(failures)
        report[f"{label}_phases"] = dict(phases)
        report[f"{label}_failures"] = failures


def build_kills(work: Path, n: int, n_pass: int, docs: int, rng: random.Random) -> dict:
    """``n`` kills at moments uniform over the whole uninterrupted build, then ``n_pass`` uniform over its
    pass alone (from tokenizer/ being written to the exit, timed from when the killed build itself wrote
    tokenizer/), so that shards and the manifest are hit too."""
    ref = work / "build-ref"
    shutil.rmtree(ref, ignore_errors=True)
    duration, pass_start = timed_run(build_args(ref, docs), ref / "tokenizer")
    print(f"[build] uninterrupted build: {duration:.1f} s (pass from {pass_start:.1f} s), "
          f"{len(shard_table(ref))} shards")
    out_report = {"uninterrupted_seconds": round(duration, 1), "pass_start_seconds": round(pass_start, 1),
                  "reference": str(ref)}

    def check(out, phase, proc):
        if proc.returncode and not phase.startswith("after the manifest"):
            ok, why = False, proc.stderr[-300:]
        else:  # after the manifest the build was complete: --resume refuses, and the cache must stand
            ok, why = same_cache(out, ref)
        return ok, "identical" if ok else "FAILED " + why, why

    kill_campaign(work, "build", lambda out: build_args(out, docs), "tokenizer", duration,
                  (("kills", n, 0.0), ("pass_kills", n_pass, pass_start)), build_phase, check, rng, out_report)
    out_report["identical"] = out_report["kills_identical"]
    out_report["failures"] = out_report["kills_failures"] + out_report["pass_kills_failures"]
    return out_report


def build_kills_s3(work: Path, ref: Path, n: int, n_pass: int, docs: int, rng: random.Random) -> dict:
    """build_kills with the cache on a local S3 endpoint (moto's server): ``n`` kills uniform over an uninterrupted
    build into s3://, ``n_pass`` over its pass (timed from its staging directory's tokenizer/, which appears as
    the local build's does); each resumed build must equal the uninterrupted remote build, which must have the
    local reference's shards (``ref``)."""
    from local_s3 import LocalS3

    from teachercache.teacher.remote_build import STAGING_ENV, staging_path

    saved = dict(ENV)
    with LocalS3("faults") as s3:
        ENV.update(s3.env, **{STAGING_ENV: str(work / "staging")})
        os.environ[STAGING_ENV] = ENV[STAGING_ENV]
        try:
            url_of = lambda out: s3.url(out.name)  # noqa: E731
            ref_url = s3.url("build-s3-ref")
            duration, pass_start = timed_run(build_args(ref_url, docs), staging_path(ref_url, 0) / "tokenizer")
            print(f"[build_s3] uninterrupted build into {ref_url}: {duration:.1f} s (pass from {pass_start:.1f} s), "
                  f"{len(shard_table(ref_url))} shards")
            report = {"uninterrupted_seconds": round(duration, 1), "pass_start_seconds": round(pass_start, 1),
                      "endpoint": "moto server on 127.0.0.1", "reference_equals_local": shard_table(ref_url) ==
                      shard_table(ref)}

            def phase_of(out: Path) -> str:
                key, staging = f"{s3.bucket}/{out.name}", staging_path(url_of(out), 0)
                s3.fs.invalidate_cache()
                if s3.fs.exists(f"{key}/manifest.json"):
                    return "after the manifest (exiting)"
                state = f"{key}/state/rank-000.json"
                done = len(json.loads(s3.fs.cat_file(state))["shards"]) if s3.fs.exists(state) else 0
                if not (staging / "tokenizer").is_dir():
                    return "starting (imports, teacher load)"
                if list((staging / "shards").glob("*")) if (staging / "shards").is_dir() else []:
                    return "inside a shard (forward/encode/write/upload)"
                return "between shards" if done else "first forward passes"

            def check(out, phase, proc):
                url = url_of(out)
                if proc.returncode and not phase.startswith("after the manifest"):
                    ok, why = False, proc.stderr[-300:]
                else:
                    ok, why = same_cache(url, ref_url)
                s3.fs.rm(f"{s3.bucket}/{out.name}", recursive=True)
                return ok, "identical" if ok else "FAILED " + why, why

            kill_campaign(work, "build_s3", lambda out: build_args(url_of(out), docs), "tokenizer", duration,
                          (("kills", n, 0.0), ("pass_kills", n_pass, pass_start)), phase_of, check, rng, report,
                          after_of=lambda out: staging_path(url_of(out), 0) / "tokenizer")
        finally:
            ENV.clear()
            ENV.update(saved)
            os.environ.pop(STAGING_ENV, None)
    report["identical"] = report["kills_identical"] + report["pass_kills_identical"]
    report["failures"] = report["kills_failures"] + report["pass_kills_failures"]
    return report


def train_phase(out: Path) -> str:
    ckpt = out / "checkpoints"
    if (out / "training_summary.json").exists():
        return "after the final save (exiting)"
    if (out / "model.safetensors").exists() or (out / "config.json").exists():
        return "saving the final model"
    if ckpt.is_dir() and list(ckpt.glob("*.partial")):
        return "writing a checkpoint"
    if ckpt.is_dir() and list(ckpt.glob("step-*")):
        return "between checkpoints"
    return "before the first checkpoint"


def max_abs_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(a), load_file(b)
    if wa.keys() != wb.keys():
        return float("inf")
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def train_kills(work: Path, cache: Path, n: int, n_loop: int, steps: int, rng: random.Random) -> dict:
    """``n`` kills uniform over an uninterrupted run (start to exit), then ``n_loop`` uniform over its
    training loop alone (timed from when the killed run opened metrics.jsonl), so that checkpoints are
    hit too; each resumed run must end with the reference's weights."""
    ref = work / "train-ref"
    shutil.rmtree(ref, ignore_errors=True)
    duration, loop_start = timed_run(train_args(cache, ref, steps), ref / "metrics.jsonl")
    print(f"[train] uninterrupted run: {duration:.1f} s (loop from {loop_start:.1f} s), {steps} steps, "
          "a checkpoint every 2")
    report = {"uninterrupted_seconds": round(duration, 1), "loop_start_seconds": round(loop_start, 1)}
    diffs = []

    def check(out, phase, proc):
        if proc.returncode != 0:
            return False, proc.stderr[-300:], proc.stderr[-300:]
        diff = max_abs_diff(out / "model.safetensors", ref / "model.safetensors")
        diffs.append(diff)
        return diff <= 1e-6, f"max |diff| {diff:.3g}", f"max |diff| {diff:.3g}"

    kill_campaign(work, "train", lambda out: train_args(cache, out, steps), "metrics.jsonl", duration,
                  (("kills", n, 0.0), ("loop_kills", n_loop, loop_start)), train_phase, check, rng, report)
    report["identical"] = report["kills_identical"]
    report["failures"] = report["kills_failures"] + report["loop_kills_failures"]
    report["max_abs_diff"] = max(diffs) if diffs else None
    return report


# ---------------------------------------------------------------------------------------------------
# Corrupted files.


def fuzz(work: Path, sound: Path, n: int, jobs: int, rng: random.Random, cli_checks: int) -> dict:
    clean = work / "fuzz-sound"
    shutil.rmtree(clean, ignore_errors=True)
    (clean / "shards").mkdir(parents=True)
    shutil.copy(sound / "manifest.json", clean / "manifest.json")
    for s in json.loads((sound / "manifest.json").read_text())["shards"]:
        shutil.copy(sound / s["file"], clean / s["file"])
    pool = fault_fuzz.Pool(jobs, timeout=60.0, env=ENV)
    expected = pool.run([{"op": "read", "path": str(clean), "checksums": True, "targets": []}], timeout=300)[0]
    assert expected["outcome"] == "silent", expected  # no expectation given: any digest reads as "silent"
    digest = expected["digest"]
    tally = {path: Counter() for path in ("reader", "verify", "deep", "reader_nochecksum", "verify_resealed",
                                          "deep_resealed")}
    by_kind, examples, bad = Counter(), [], []
    errors = {"reader": Counter(), "reader_nochecksum": Counter()}
    silent_decoder, silent_kinds, silent_examples, t0, done = 0, Counter(), [], time.time(), 0
    batch = max(jobs * 4, 8)
    while done < n:
        cases = []
        for j in range(min(batch, n - done)):
            case = work / "fuzz" / f"case-{done + j:05d}"
            kind, targets, what = fault_fuzz.make_case(clean, case, rng)
            by_kind[kind] += 1
            cases.append((case, kind, targets, what))
        requests, index = [], []
        for c, (case, kind, targets, what) in enumerate(cases):
            # damage to the manifest may be reported at the shard it describes ("..., the manifest says N")
            named = targets + (["the manifest"] if kind.startswith("manifest") else
                               [str(Path(t).relative_to(case)) for t in targets])  # CachePathError: 'shards/...'

            base = {"path": str(case), "targets": named}
            requests += [{**base, "op": "read", "checksums": True, "expected": digest},
                         {**base, "op": "verify", "deep": False}, {**base, "op": "verify", "deep": True}]
            index += [(c, "reader"), (c, "verify"), (c, "deep")]
            if not kind.startswith("manifest"):  # what the decoder alone makes of the damage
                requests.append({**base, "op": "read", "checksums": False, "expected": digest})
                index.append((c, "reader_nochecksum"))
                sealed = case.with_name(case.name + "-sealed")
                if fault_fuzz.reseal(case, sealed, targets):
                    moved = [t.replace(str(case), str(sealed)) for t in targets]
                    requests += [{"op": "verify", "deep": False, "path": str(sealed), "targets": moved},
                                 {"op": "verify", "deep": True, "path": str(sealed), "targets": moved}]
                    index += [(c, "verify_resealed"), (c, "deep_resealed")]
        answers = pool.run(requests)
        per_case: dict[int, dict] = {}
        for (c, path), answer in zip(index, answers):
            per_case.setdefault(c, {})[path] = answer
        for c, results in per_case.items():
            case, kind, targets, what = cases[c]
            for path, answer in results.items():
                tally[path][answer["outcome"]] += 1
                if path.startswith("reader") and answer["outcome"] in ("caught", "unnamed"):
                    errors[path][answer["error"]] += 1
            reader = results["reader"]["outcome"]
            for path in ("verify", "deep"):  # verify clean must mean the reader read the sound values
                if results[path]["outcome"] == "clean" and reader != "same":
                    tally[path]["missed"] += 1
            if results.get("reader_nochecksum", {}).get("outcome") == "silent":
                silent_decoder += 1
                silent_kinds[kind] += 1
                if len(silent_examples) < 20:
                    silent_examples.append((kind, what, results.get("deep_resealed", {}).get("outcome")))
            failed = {p: a for p, a in results.items() if a["outcome"] in ("crash", "hang", "unnamed")
                      or (a["outcome"] == "silent" and p == "reader")}
            if failed:
                bad.append({"kind": kind, "what": what, "results": failed})
            elif len(examples) < 40 and reader == "caught":
                examples.append((kind, what, results["reader"]["error"], results["reader"]["message"]))
            shutil.rmtree(case, ignore_errors=True)
            shutil.rmtree(case.with_name(case.name + "-sealed"), ignore_errors=True)
        done += len(cases)
        if done % 200 < len(cases) or done == n:
            print(f"[fuzz] {done}/{n} cases, {time.time() - t0:.0f} s, failures so far: {len(bad)}")
    cli_results = cli_verify_checks(work, clean, rng, cli_checks)
    pool.close()
    return {"cases": n, "by_kind": dict(by_kind), "outcomes": {k: dict(v) for k, v in tally.items()},
            "decoder_only_different_values": silent_decoder,
            "decoder_only_by_kind": dict(silent_kinds), "decoder_only_examples": silent_examples, "failures": bad[:50], "failure_count": len(bad),
            "examples": examples, "errors_by_class": {k: dict(v) for k, v in errors.items()}, "cli": cli_results,
            "seconds": round(time.time() - t0, 1)}


def cli_verify_checks(work: Path, clean: Path, rng: random.Random, n: int) -> dict:
    """`teachercache verify --deep` as a user runs it on damaged caches: exit 1, the file named, no
    traceback."""
    good = 0
    failures = []
    for i in range(n):
        case = work / "fuzz" / f"cli-{i}"
        kind, targets, what = fault_fuzz.make_case(clean, case, rng)
        proc = run(cli("verify", case, "--deep"), timeout=120)
        text = proc.stdout + proc.stderr
        named = targets + (["the manifest"] if kind.startswith("manifest") else [])
        ok = proc.returncode == 1 and "Traceback" not in text and any(t in text for t in named)
        harmless = proc.returncode == 0 and "reversed" in what
        good += ok or harmless
        if not (ok or harmless):
            failures.append({"kind": kind, "what": what, "rc": proc.returncode, "output": text[-400:]})
        shutil.rmtree(case, ignore_errors=True)
    return {"runs": n, "ok": good, "failures": failures}


# ---------------------------------------------------------------------------------------------------
# Out of disk, two builds at once.


def disk_full(work: Path, ref: Path, docs: int, rounds: int) -> dict:
    if os.geteuid() != 0:
        return {"skipped": "not root: cannot mount a tmpfs"}
    results = []
    for r in range(rounds):
        mnt = Path(tempfile.mkdtemp(prefix="tc-tmpfs-"))
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            return {"skipped": f"mount refused: {mounted.stderr.strip()}"}
        try:
            tokenizer = sum(p.stat().st_size for p in (ref / "tokenizer").iterdir())
            room = tokenizer + [20_000, 70_000, 130_000][r % 3]  # fail in the first, second or a later shard
            free = shutil.disk_usage(mnt).free
            (mnt / "ballast").write_bytes(bytes(free - room))
            out = mnt / "cache"
            proc = run(build_args(out, docs))
            message = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
            clear = (proc.returncode == 1 and "Traceback" not in proc.stderr and str(out) in message
                     and "disk is full" in message)
            (mnt / "ballast").unlink()
            resumed = run(build_args(out, docs) + ["--resume"])
            ok, why = (False, resumed.stderr[-300:]) if resumed.returncode else same_cache(out, ref)
            results.append({"room_bytes": room, "exit": proc.returncode, "message": message, "clear": clear,
                            "traceback": "Traceback" in proc.stderr,
                            "resumed_identical": ok, "why": why})
            print(f"[disk] room {room:,} B: exit {proc.returncode}, {message!r}; resume: {why}")
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True)
            mnt.rmdir()
    return {"rounds": results, "all_clear": all(r["clear"] for r in results),
            "all_resumed": all(r["resumed_identical"] for r in results), "how": "tmpfs mount, size=2m, ballast file"}


def _lock_held(out: Path) -> bool:
    import fcntl

    lock = out / "state" / "rank-000.lock"
    if not lock.exists():
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def two_builds(work: Path, ref: Path, docs: int, together_rounds: int, running_rounds: int) -> dict:
    """Two builds started together (one must be refused, the other's cache equals the reference), and
    --resume / --overwrite builds started while one holds its lock (it is stopped with SIGSTOP meanwhile,
    so the timing is not luck): both refused, the running build's cache untouched."""
    results = []
    for r in range(together_rounds):
        out = work / f"lock-together-{r}"
        procs = [subprocess.Popen(build_args(out, docs), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=ROOT) for _ in range(2)]
        errs = [p.communicate(timeout=600)[1] for p in procs]
        codes = sorted(p.returncode for p in procs)
        loser = next((e for p, e in zip(procs, errs) if p.returncode), "")
        refused = codes == [0, 1] and ("another build" in loser or "not empty" in loser)
        same, why = same_cache(out, ref)
        results.append({"scenario": "started together", "exit_codes": codes, "refused": refused,
                        "message": _last_line(loser), "identical": same, "why": why})
        print(f"[lock] together: exit codes {codes}, {_last_line(loser)!r}; the cache: {why}")
        shutil.rmtree(out, ignore_errors=True)
    for r in range(running_rounds):
        out = work / f"lock-running-{r}"
        a = subprocess.Popen(build_args(out, docs), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, cwd=ROOT)
        deadline = time.time() + 120
        while not _lock_held(out) and time.time() < deadline and a.poll() is None:
            time.sleep(0.01)
        a.send_signal(signal.SIGSTOP)  # holds its lock, and cannot finish before the others have tried
        try:
            later = {flag: subprocess.Popen(build_args(out, docs) + [flag], env=ENV, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
                     for flag in ("--resume", "--overwrite")}
            errs = {flag: p.communicate(timeout=600)[1] for flag, p in later.items()}
        finally:
            a.send_signal(signal.SIGCONT)
        a.communicate(timeout=600)
        refused = {flag: later[flag].returncode == 1 and "another build" in errs[flag] for flag in later}
        same, why = same_cache(out, ref)
        results.append({"scenario": "while one runs", "refused": all(refused.values()), "by_flag": refused,
                        "message": _last_line(errs["--resume"]), "exit_code": a.returncode, "identical": same,
                        "why": why})
        print(f"[lock] while one runs: refused {refused}, {_last_line(errs['--resume'])!r}; the cache: {why}")
        shutil.rmtree(out, ignore_errors=True)
    return {"rounds": results, "all_ok": all(x["refused"] and x["identical"] for x in results)}


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else ""


# ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few cases of each kind (about a minute)")
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--only", default="build,train,fuzz,disk,lock,hostile",
                        help="sections, of build,s3,train,fuzz,disk,lock,hostile (s3: the build kills on a local S3 "
                             "endpoint; not run unless named)")
    parser.add_argument("--build-kills", type=int, default=None)
    parser.add_argument("--pass-kills", type=int, default=None, help="extra build kills within its pass")
    parser.add_argument("--train-kills", type=int, default=None)
    parser.add_argument("--loop-kills", type=int, default=None, help="extra train kills within its loop")
    parser.add_argument("--fuzz-cases", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=2, help="fuzz worker processes")
    parser.add_argument("--workdir", default=None, help="keep the work files here (default: a temp dir)")
    args = parser.parse_args()
    quick = args.quick
    n_build = args.build_kills if args.build_kills is not None else (2 if quick else 20)
    n_pass = args.pass_kills if args.pass_kills is not None else (0 if quick else 10)
    n_loop = args.loop_kills if args.loop_kills is not None else (0 if quick else 10)
    n_train = args.train_kills if args.train_kills is not None else (1 if quick else 20)
    n_fuzz = args.fuzz_cases if args.fuzz_cases is not None else (60 if quick else 1500)
    docs = 1 if quick else 6
    sections = set(args.only.split(","))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tc-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    started = time.time()
    report: dict = {"quick": quick, "seed": args.seed, "command": " ".join(["python", "tools/faults.py"] + sys.argv[1:])}
    try:
        build = build_kills(work, n_build if "build" in sections else 0,
                            n_pass if "build" in sections else 0, docs, rng)
        report["build"] = build
        ref = Path(build["reference"])
        if "s3" in sections:
            report["build_s3"] = build_kills_s3(work, ref, n_build, n_pass, docs, rng)
        if "train" in sections:
            report["train"] = train_kills(work, ref, n_train, n_loop, 8 if quick else 16, rng)
        if "fuzz" in sections:
            report["fuzz"] = fuzz(work, ref, n_fuzz, args.jobs, rng, 0 if quick else 12)
        if "disk" in sections:
            report["disk"] = disk_full(work, ref, docs, 1 if quick else 3)
        if "lock" in sections:
            report["lock"] = two_builds(work, ref, docs, 0 if quick else 2, 1 if quick else 2)
        if "hostile" in sections:
            report["hostile"] = hostile_inputs.hostile(work, ref, ENV, quick)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.time() - started, 1)
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
