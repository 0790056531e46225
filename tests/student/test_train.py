"""The trainer end to end on CPU: caches built from the demo teacher, students trained from them alone."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from teachercache.student.checkpoints import latest_checkpoint
from teachercache.student.evaluate import evaluate_model
from teachercache.student.model import TrainError, load_student
from teachercache.student.options import (CheckpointOptions, EvalOptions, HintOptions, KDOptions, LoaderOptions, ScheduleOptions,
                             TrainOptions)
from teachercache.student.train import train
from teachercache.errors import TeachercacheError
from teachercache.format.manifest import TargetSpec
from teachercache.teacher.build import BuildOptions, build_cache
from teachercache.teacher.corpus import DataOptions

ROOT = Path(__file__).resolve().parents[2]
TEACHER = ROOT / "data" / "teacher"
TRAIN = ROOT / "data" / "corpus" / "train.parquet"
VALID = ROOT / "data" / "corpus" / "valid.parquet"


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """A training cache (top-16, teacher layer 2 stored) and a held-out cache, from the demo teacher."""
    root = tmp_path_factory.mktemp("caches")
    for name, corpus, docs in (("train", TRAIN, 3), ("valid", VALID, 1)):
        build_cache(BuildOptions(teacher=str(TEACHER), out=str(root / name), progress=False, batch_size=8,
                                 data=DataOptions(paths=(str(corpus),), seq_len=64, max_docs=docs),
                                 targets=TargetSpec(kind="topk", k=16), hidden_layers=(2,)))
    return root / "train", root / "valid"


def _options(caches, out, steps=12, kd=KDOptions(), hint=HintOptions(), eval=EvalOptions(), **kw) -> TrainOptions:
    """The tests' run: a tiny student, 12 steps of 4 rows; ``kw`` sets other TrainOptions fields."""
    kw.setdefault("student", "llama-tiny")
    return TrainOptions(cache=str(caches[0]), out=str(out), progress=False, log_every=1,
                        schedule=ScheduleOptions(steps=steps, batch_size=4, lr=3e-3, warmup_steps=2),
                        loader=LoaderOptions(shuffle_buffer=64), kd=kd, hint=hint, eval=eval, **kw)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_from_the_cache_moves_the_student_towards_the_teacher(caches, tmp_path):
    tok = AutoTokenizer.from_pretrained(caches[0] / "tokenizer")
    torch.manual_seed(0)
    untrained = load_student("llama-tiny", 8192)
    before = evaluate_model(untrained, caches[1], tok, batch_size=8)
    result = train(_options(caches, tmp_path / "s", steps=40, eval=EvalOptions(data=str(caches[1]), every=20)))
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    after = evaluate_model(student, caches[1], tok, batch_size=8)
    assert after.kd_loss < 0.8 * before.kd_loss
    assert after.perplexity < 0.8 * before.perplexity
    assert after.teacher_agreement > before.teacher_agreement + 0.05
    assert result.eval["kd_loss"] == pytest.approx(after.kd_loss, rel=1e-4)
    summary = json.loads((tmp_path / "s" / "training_summary.json").read_text())
    assert summary["steps"] == 40 and summary["kd"]["loss"] == "forward_kl"
    assert set(summary) == {"options", "steps", "final_loss", "eval", "seconds", "cache", "cache_fingerprint", "kd"}
    assert summary["options"]["schedule"]["steps"] == 40 and summary["options"]["eval"]["every"] == 20
    assert summary["final_loss"] == result.final_loss and summary["eval"] == result.eval
    assert (tmp_path / "s" / "model.safetensors").is_file() and (tmp_path / "s" / "tokenizer.json").is_file()
    rows = _metrics(tmp_path / "s")
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert rows[-1]["kd"] < rows[0]["kd"]


def test_fused_head_trains_exactly_like_the_unfused_path(caches, tmp_path):
    a = train(_options(caches, tmp_path / "a", steps=3, kd=KDOptions(ce_weight=0.5, temperature=1.5)))
    b = train(_options(caches, tmp_path / "b", steps=3, kd=KDOptions(ce_weight=0.5, temperature=1.5), fused_head=True,
                       chunk_size=50))
    la, lb = _metrics(a.out), _metrics(b.out)
    for x, y in zip(la, lb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
    wa, wb = load_file(a.out / "model.safetensors"), load_file(b.out / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-5)


def test_hint_loss_trains_and_saves_phi(caches, tmp_path):
    result = train(_options(caches, tmp_path / "h", steps=3, hint=HintOptions(layers="1:2", weight=0.5)))
    rows = _metrics(result.out)
    assert all(r["hint"] > 0 for r in rows)
    phi = load_file(result.out / "hint_projector.safetensors")
    assert [tuple(v.shape) for v in phi.values()] == [(256, 64)]   # teacher width 256, student 64


def test_bad_starts_are_refused_before_any_step(caches, tmp_path):
    with pytest.raises(TeachercacheError, match="stores teacher layers 2, not 3"):
        train(_options(caches, tmp_path / "x1", hint=HintOptions(layers="1:3")))
    with pytest.raises(TeachercacheError, match="student has layers 0..2"):
        train(_options(caches, tmp_path / "x2", hint=HintOptions(layers="5:2")))
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"model_type": "llama", "vocab_size": 4000, "hidden_size": 32,
                                 "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}))
    with pytest.raises(TeachercacheError, match="only 4000 columns"):
        train(_options(caches, tmp_path / "x3", student=str(small)))
    # a student with its own, different tokenizer
    other = tmp_path / "other"
    tok = AutoTokenizer.from_pretrained(TEACHER)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    load_student("llama-tiny", 8200).save_pretrained(other)
    with pytest.raises(TeachercacheError, match="not the one the cache was built with"):
        train(_options(caches, tmp_path / "x4", student=str(other)))
    # no hidden states in the cache
    bare = tmp_path / "bare"
    build_cache(BuildOptions(teacher=str(TEACHER), out=str(bare), progress=False,
                             data=DataOptions(paths=(str(VALID),), seq_len=32, max_docs=1),
                             targets=TargetSpec(kind="topk", k=4)))
    with pytest.raises(TeachercacheError, match="stores no hidden states"):
        train(_options((bare, None), tmp_path / "x5", hint=HintOptions(layers="1:2")))
    for i in range(1, 6):
        assert not (tmp_path / f"x{i}" / "model.safetensors").exists()


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "teachercache", "train", *args]


def test_killed_training_resumes_to_the_same_weights(caches, tmp_path):
    args = ["--cache", str(caches[0]), "--student", "llama-tiny", "--steps", "16", "--batch-size", "4",
            "--checkpoint-every", "4", "--no-progress", "--seed", "3", "--warmup-steps", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(_cli(*args, "--out", str(tmp_path / "whole")), check=True, env=env, capture_output=True)
    kept = sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir())
    assert kept == ["step-12", "step-16"]                                 # the two newest are kept
    assert latest_checkpoint(tmp_path / "whole") == tmp_path / "whole" / "checkpoints" / "step-16"
    state = json.loads((tmp_path / "whole" / "checkpoints" / "step-16" / "state.json").read_text())["state"]
    assert state["step"] == 16 and set(state) == {"step", "epoch", "batches"}
    proc = subprocess.Popen(_cli(*args, "--out", str(tmp_path / "killed")), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "checkpoints" / "step-8").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    subprocess.run(_cli(*args, "--out", str(tmp_path / "killed"), "--resume"), check=True, env=env,
                   capture_output=True)
    logged = [r["step"] for r in _metrics(tmp_path / "killed")]
    assert logged == [r["step"] for r in _metrics(tmp_path / "whole")]    # every step logged once
    want = load_file(tmp_path / "whole" / "model.safetensors")
    got = load_file(tmp_path / "killed" / "model.safetensors")
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)


def test_two_gloo_ranks_follow_the_one_rank_loss_curve(caches, tmp_path):
    common = ["--cache", str(caches[0]), "--student", "llama-tiny", "--steps", "5", "--no-shuffle", "--no-progress",
              "--log-every", "1", "--warmup-steps", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli(*common, "--batch-size", "4", "--out", str(tmp_path / "one")), check=True, env=env,
                   capture_output=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", "29517", "-m", "teachercache", "train", *common, "--batch-size", "2",
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    one, both = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["step"] for r in both] == [1, 2, 3, 4, 5]
    for a, b in zip(one, both):
        assert a["positions"] == b["positions"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_online_teacher_baseline_runs_the_same_loop(caches, tmp_path):
    result = train(_options(caches, tmp_path / "o", steps=3, online_teacher=str(TEACHER)))
    rows = _metrics(result.out)
    assert len(rows) == 3 and all(r["kd"] > 0 for r in rows)
    with pytest.raises(TrainError, match="forward_kl"):
        train(replace(_options(caches, tmp_path / "o2", steps=1, online_teacher=str(TEACHER)), kd=KDOptions(loss="tvd")))


def test_a_non_finite_step_stops_the_run_and_names_the_last_good_checkpoint(caches, tmp_path):
    # a learning rate of 1e20: step 1 is finite and moves every weight by ~1e20 (still finite); step 2's
    # gradient is then NaN (its RMSNorms overflow)
    out = tmp_path / "run"
    options = _options(caches, out, steps=6, checkpoints=CheckpointOptions(every=1, keep=10))
    options = replace(options, schedule=replace(options.schedule, lr=1e20, warmup_steps=0))
    with pytest.raises(TrainError, match=r"step 2: the loss \([^)]+\) or gradient norm \(nan\) is not finite for 1 "
                                         r"consecutive step.*the last good checkpoint is .*step-1 "):
        train(options)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
    assert not (out / "model.safetensors").exists()                      # no model from a diverged run
    assert [r["step"] for r in _metrics(out)] == [1]                     # the NaN step is not logged as trained
    # --max-nonfinite-steps 2: step 2 is skipped without an update (its checkpoint holds step 1's weights),
    # step 3 is NaN again and stops the run, naming step 2's checkpoint
    out = tmp_path / "tolerant"
    with pytest.raises(TrainError, match=r"step 3: .* for 2 consecutive step.*last good checkpoint is .*step-2 "):
        train(replace(options, out=str(out), max_nonfinite_steps=2))
    step1 = load_file(out / "checkpoints" / "step-1" / "model.safetensors")
    step2 = load_file(out / "checkpoints" / "step-2" / "model.safetensors")
    assert all(torch.equal(step1[k], step2[k]) and torch.isfinite(step1[k]).all() for k in step1)
    assert [r.get("skipped") is not None for r in _metrics(out)] == [False, True]


def test_temperature_with_the_rest_tail_warns_once_with_its_bounds(caches, tmp_path):
    options = _options(caches, tmp_path / "warm", steps=2, kd=KDOptions(temperature=2.0))
    with pytest.warns(UserWarning, match=r"--temperature 2 with --tail rest: .* tempered as if it were one token\. "
                                         r"On the first batch it holds \d+\.\d% .* between \d+\.\d% and \d+\.\d%") as got:
        train(options)
    assert len([w for w in got if "tempered as if" in str(w.message)]) == 1


def test_train_writes_only_into_its_own_runs(caches, tmp_path):
    from teachercache.format.outputs import MARKER, OutputError

    # a model directory (here the demo teacher's files) is neither resumed nor written into
    teacher_copy = tmp_path / "t3"
    shutil.copytree(TEACHER, teacher_copy)
    before = {p.name: p.read_bytes() for p in teacher_copy.iterdir()}
    for resume in (False, True):
        with pytest.raises(OutputError, match=r"t3: not a teachercache training run but a model directory "
                                              r"\(config.json, .*choose another --out"):
            train(_options(caches, teacher_copy, steps=1, checkpoints=CheckpointOptions(resume=resume)))
    assert {p.name: p.read_bytes() for p in teacher_copy.iterdir()} == before
    # a finished run: not written over; --resume finds it complete and leaves it (0.2 retrained it from step 0)
    out = tmp_path / "done"
    train(_options(caches, out, steps=2))
    assert json.loads((out / MARKER).read_text())["kind"] == "student"
    with pytest.raises(OutputError, match=r"already holds a teachercache training run; add --resume"):
        train(_options(caches, out, steps=2))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    again = train(_options(caches, out, steps=2, checkpoints=CheckpointOptions(resume=True)))
    assert again.complete and again.steps == 2                           # nothing retrained or rewritten
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # an unwritable --out
    with pytest.raises(TrainError, match=r"/sys/teachercache-test: cannot write there"):
        train(_options(caches, "/sys/teachercache-test", steps=1))


def test_resume_with_other_options_is_refused_listing_them(caches, tmp_path):
    from teachercache.format.outputs import OutputError

    out = tmp_path / "run"
    base = _options(caches, out, steps=4, checkpoints=CheckpointOptions(every=2))
    options = replace(base, schedule=replace(base.schedule, steps=4))
    result = train(replace(options, schedule=replace(options.schedule, steps=4)))
    (out / "training_summary.json").unlink()              # as if killed after its last checkpoint
    resumed = replace(options, checkpoints=CheckpointOptions(every=2, resume=True))
    changed = replace(resumed, kd=KDOptions(loss="reverse_kl"), schedule=replace(options.schedule, lr=1e-2, batch_size=2),
                      cache=str(caches[1]))
    with pytest.raises(OutputError, match=r"--resume with other options than the run it continues: "
                                          r"cache: '.*train' -> '.*valid'; kd.loss: None -> 'reverse_kl'; "
                                          r"schedule.batch_size: 4 -> 2; schedule.lr: 0.003 -> 0.01\."):
        train(changed)
    # options a resumed run may change (docs/train.md): accepted
    ok = replace(resumed, progress=False, log_every=2, eval=EvalOptions(every=1),
                 checkpoints=CheckpointOptions(every=1, keep=5, resume=True))
    assert train(ok).steps == result.steps


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(caches, tmp_path):
    out = tmp_path / "busy"
    args = ["--cache", str(caches[0]), "--student", "llama-tiny", "--steps", "400", "--batch-size", "4",
            "--checkpoint-every", "1", "--no-progress", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(_cli(*args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints").exists():
            assert first.poll() is None and time.time() < deadline, "the first run ended early"
            time.sleep(0.05)
        second = subprocess.run(_cli(*args, "--resume"), env=env, capture_output=True, text=True)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert "another training run is writing into this directory" in second.stderr
    finally:
        first.kill()
        first.wait()


@pytest.mark.parametrize("flag,value,message", [
    ("--lr", "inf", r"lr \(--lr\) must be a finite number in \(0, inf\], got inf"),
    ("--lr", "nan", r"lr \(--lr\) must be a finite number"),
    ("--kd-alpha", "nan", r"kd_weight \(--kd-alpha\) must be a finite number in \[0, inf\], got nan"),
    ("--kd-alpha", "-1", r"kd_weight \(--kd-alpha\) must be a finite number in \[0, inf\], got -1.0"),
    ("--max-grad-norm", "nan", r"max_grad_norm \(--max-grad-norm\) must be a finite number"),
    ("--temperature", "inf", r"temperature \(--temperature\) must be a finite number in \(0, inf\]"),
    ("--hint-alpha", "-0.5", r"hint weight \(--hint-alpha\) must be a finite number in \[0, inf\]"),
])
def test_non_finite_and_negative_hyper_parameters_are_refused(caches, tmp_path, flag, value, message):
    proc = subprocess.run(_cli("--cache", str(caches[0]), "--student", "llama-tiny", "--steps", "1",
                               "--out", str(tmp_path / "x"), "--no-progress", flag, value),
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert re.search(message, proc.stderr), proc.stderr
    assert not (tmp_path / "x").exists()


def test_grad_accum_gives_the_step_of_one_big_batch(tmp_path):
    """--batch-size x --grad-accum 4x1, 2x2 and 1x4 read the same 4 rows per step and give the same loss and
    weights: every target position of the step weighs 1 / (the step's positions). The rows have different
    numbers of target positions, so averaging micro-batch means would differ."""
    corpus = tmp_path / "uneven.jsonl"
    words = "the river ran past the old mill and on towards the sea where boats waited".split()
    corpus.write_text("".join(json.dumps({"text": " ".join(words[: 3 + 2 * i])}) + "\n" for i in range(8)))
    cache = tmp_path / "cache"
    build_cache(BuildOptions(teacher=str(TEACHER), out=str(cache), progress=False,
                             data=DataOptions(paths=(str(corpus),), seq_len=64, packing="document"),
                             targets=TargetSpec(kind="topk", k=8)))
    runs = {}
    for batch, accum in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"s{batch}x{accum}"
        train(TrainOptions(cache=str(cache), student="llama-tiny", out=str(out), progress=False, log_every=1,
                           schedule=ScheduleOptions(steps=2, batch_size=batch, grad_accum=accum, lr=3e-3,
                                                    warmup_steps=0, max_grad_norm=1e9),
                           loader=LoaderOptions(shuffle=False), kd=KDOptions(ce_weight=0.25)))
        runs[batch, accum] = (_metrics(out), load_file(out / "model.safetensors"))
    (rows, weights) = runs[4, 1]
    assert len(rows) == 2 and rows[0]["loss"] > 0.5
    for shape in ((2, 2), (1, 4)):
        other_rows, other_weights = runs[shape]
        for a, b in zip(rows, other_rows):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), shape
            assert b["kd"] == pytest.approx(a["kd"], rel=1e-4), shape
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), shape
            assert b["positions"] == a["positions"], shape
        for k in weights:   # Adam turns rounding in near-zero gradients into differences up to ~1e-5 (lr 3e-3)
            torch.testing.assert_close(other_weights[k], weights[k], rtol=0, atol=1e-4)
