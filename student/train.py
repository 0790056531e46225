"""Train a student from a cache alone: ``train(TrainOptions(...))`` or ``teachercache train``.

``set_up`` opens the cache, loads and checks the student (student.model), builds φ, AdamW and the
warmup + cosine schedule, and resumes from the latest checkpoint (student.checkpoints). Then the loop:
``optimizer_step`` takes ``grad_accum`` micro-batches (student.collate.StudentBatch), weighs every target
position by 1 / (positions in the global step, all micro-batches and ranks: one all-reduce), runs
``micro_batch_loss`` = ce_alpha·CE + kd_alpha·T²·KD (+ hint_alpha·hint) and backward on each, sums the
gradients over ranks, clips and steps; ``after_step`` logs ``metrics.jsonl`` (and sends it to --report-to's
reporter, student.tracking), evaluates (student.evaluate) and writes checkpoints. At the end the student is
saved with ``save_pretrained`` beside its tokenizer, φ and ``training_summary.json``.

Multi-process: run under ``torchrun`` (gloo on CPU, NCCL on CUDA: teachercache.runtime). Gradients are
summed with explicit all-reduces rather than a DistributedDataParallel wrapper, so the fused-head path
(the model's body and head called separately) needs no special casing; only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from teachercache.student.checkpoints import checkpoint_path, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from teachercache.student.collate import StudentBatch, collate_rows
from teachercache.student.cross_batch import CrossBatch, check_cross_options, cross_batch_loss, cross_collator
from teachercache.student.dataset import CacheDataset, make_loader
from teachercache.student.evaluate import evaluate_model
from teachercache.student.fused_head import fused_linear_sparse_kd
from teachercache.student.hint import HintProjector, hint_loss, parse_layer_map
from teachercache.student.kd_types import KDConfig, rest_tempering
from teachercache.student.losses import sparse_kd_loss
from teachercache.student.model import (TrainError, check_fusable, check_student, load_online_teacher, load_student, online_kd_loss,
                           student_tokenizer)
from teachercache.student.options import ScheduleOptions, TrainOptions
from teachercache.student.tracking import check_reporter, open_reporter
from teachercache.format.cache import Cache
from teachercache.format.outputs import check_output, hold_lock, options_record, write_marker
from teachercache.runtime import pad_id, rank_and_world, resolve_device

METRICS_FILE = "metrics.jsonl"
"""One JSON line per logged step, in the output directory."""
SUMMARY_FILE = "training_summary.json"
"""The run's options, result and cache, written with the trained student."""
PARTS = ("loss", "ce", "kd", "hint")
"""The summed loss terms of a step, as logged."""
RESUME_SAFE = frozenset({"out", "progress", "log_every", "device", "trust_remote_code", "max_nonfinite_steps",
                         "eval.data", "eval.every", "eval.rows", "eval.seq_len", "checkpoints.every",
                         "checkpoints.keep", "checkpoints.resume", "report_to", "loader.prefetch_shards",
                         "loader.cache_dir", "loader.cache_dir_gb"})
"""Options a resumed run may change: they decide neither the data, its order, nor the updates. Any other
difference from the run's recorded options (its marker) is refused (docs/train.md)."""
CROSS_TOKENIZER_KEYS = frozenset({"cross_tokenizer", "unaligned_ce_weight"})
"""Left out of the marker of a run without --cross-tokenizer: its record stays what it was before them."""


@dataclass
class TrainResult:
    out: Path
    steps: int
    final_loss: float
    seconds: float
    eval: dict | None
    complete: bool = False
    """True when --resume found the run already complete and trained nothing."""


@dataclass
class TrainState:
    """Where the loop is; every checkpoint stores it (state.json) to resume exactly there."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Epoch of this rank's data stream."""
    batches: int = 0
    """Micro-batches delivered in that epoch."""


def kd_config(options: TrainOptions, sampled: bool) -> KDConfig:
    """The kernels' KDConfig of this run; TrainError when an option is out of range."""
    if options.kd.loss == "sampled_ce" and not sampled:
        raise TrainError("--kd-loss sampled_ce needs a cache of sampled targets (build with --target sample)")
    try:
        return options.kd.config(sampled)
    except ValueError as e:  # --temperature, --beta, --skew-alpha out of range
        raise TrainError(f"KD options: {e} (see teachercache train --help)") from None


def lr_lambda(schedule: ScheduleOptions):
    """Linear warmup to lr, then cosine down to min_lr_ratio × lr at the last step."""
    def f(step: int) -> float:
        if step < schedule.warmup_steps:
            return (step + 1) / schedule.warmup_steps
        span = max(1, schedule.steps - schedule.warmup_steps)
        progress = min(1.0, (step - schedule.warmup_steps) / span)
        return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


class BatchStream:
    """Endless micro-batches, epoch after epoch, from a saved data position on. ``epoch`` and ``batches``
    (micro-batches delivered in that epoch) are what a checkpoint stores to resume exactly here."""

    def __init__(self, dataset: CacheDataset, batch_size: int, num_workers: int, collate, epoch: int = 0,
                 batches: int = 0):
        self.dataset, self.batch_size, self.num_workers, self.collate = dataset, batch_size, num_workers, collate
        self.epoch, self.batches = epoch, batches
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> StudentBatch:
        while True:
            if self._it is None:
                self.dataset.set_epoch(self.epoch)
                self.dataset.set_position(self.epoch, self.batches, self.batch_size)
                self._it = iter(make_loader(self.dataset, self.batch_size, self.num_workers, self.collate))
            try:
                batch = next(self._it)
            except StopIteration:
                if self.batches == 0:
                    raise TrainError(f"{self.dataset.cache.path}: this rank's share of the cache holds no rows") from None
                self.epoch, self.batches, self._it = self.epoch + 1, 0, None
                continue
            self.batches += 1
            return batch


# --------------------------------------------------------------------------------------------------------
# set-up


@dataclass
class Run:
    """Everything ``set_up`` builds and the loop uses."""

    options: TrainOptions
    rank: int
    world: int
    device: torch.device
    out: Path
    cache: Cache
    config: KDConfig
    tokenizer: object
    model: torch.nn.Module
    projector: HintProjector | None
    teacher: torch.nn.Module | None      # --online-teacher only
    params: list                         # the model's and φ's parameters
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    state: TrainState
    stream: BatchStream
    lock: object = None                  # rank 0: the open file holding --out's lock
    nonfinite: int = 0                   # consecutive steps skipped for a non-finite loss or gradient
    rest_checked: bool = False           # the once-per-run warning about the rest bucket at T != 1
    reporter: object = None              # rank 0: where --report-to sends the metrics (student.tracking)


def prepare_student(options: TrainOptions, cache: Cache, device: torch.device):
    """(tokenizer, student on ``device``, φ or None, hint pairs), checked against the cache."""
    if options.cross_tokenizer:
        check_cross_options(options)
    tokenizer = student_tokenizer(options.student, cache, options.trust_remote_code)
    model = load_student(options.student, cache.layout.vocab_size, options.trust_remote_code).to(device)
    hint_pairs = parse_layer_map(options.hint.layers) if options.hint.layers else []
    check_student(model, tokenizer, cache, hint_pairs, options.cross_tokenizer)
    if options.fused_head:
        check_fusable(model)
    projector = None
    if hint_pairs:
        projector = HintProjector(hint_pairs, model.config.hidden_size, cache.layout.hidden_width).to(device)
    return tokenizer, model, projector, hint_pairs


def set_up(options: TrainOptions) -> Run:
    """Seed, load and check everything, resume from the latest checkpoint when asked; nothing is trained.
    The order (seeding, then the student's weights, then φ) fixes what the seed produces."""
    device = resolve_device(options.device)
    rank, world = rank_and_world(device.type == "cuda")
    torch.manual_seed(options.seed)
    random.seed(options.seed)
    np.random.seed(options.seed)
    out = Path(options.out)
    record = _record(options)
    check_output(out, "student", record=record, resume=options.checkpoints.resume)
    check_reporter(options.report_to)   # a missing package is named before anything loads
    cache = Cache.open(options.cache, **options.loader.cache_kwargs())
    config = kd_config(options, cache.layout.sampled)
    tokenizer, model, projector, hint_pairs = prepare_student(options, cache, device)
    teacher = None
    if options.online_teacher:
        teacher = load_online_teacher(options.online_teacher, config, cache.layout.vocab_size, device,
                                      fused_head=options.fused_head, trust_remote_code=options.trust_remote_code)
    if world > 1:
        dist.barrier()   # every rank has looked at --out before rank 0 writes into it

    params = list(model.parameters()) + (list(projector.parameters()) if projector is not None else [])
    optimizer = torch.optim.AdamW(params, lr=options.schedule.lr, weight_decay=options.schedule.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(options.schedule))
    state = TrainState()
    checkpoint = latest_checkpoint(out) if options.checkpoints.resume else None
    if checkpoint is not None:
        state = TrainState(**load_checkpoint(checkpoint, model, optimizer, scheduler, projector))
    lock = _claim_output(out, record) if rank == 0 else None

    dataset = CacheDataset(cache, rank=rank, world_size=world, seed=options.seed, shuffle=options.loader.shuffle,
                           shuffle_buffer=options.loader.shuffle_buffer,
                           hidden_layers=sorted({t for _, t in hint_pairs}))
    collate = partial(collate_rows, pad_id=pad_id(tokenizer))
    if options.cross_tokenizer:   # rows in the student's own tokens, targets aligned (student.cross_batch)
        collate = cross_collator(options, cache, cache.tokenizer(), tokenizer, out, pad_id(tokenizer), write=rank == 0)
    stream = BatchStream(dataset, options.schedule.batch_size, options.loader.num_workers, collate, state.epoch,
                         state.batches)
    return Run(options=options, rank=rank, world=world, device=device, out=out, cache=cache, config=config,
               tokenizer=tokenizer, model=model, projector=projector, teacher=teacher, params=params,
               optimizer=optimizer, scheduler=scheduler, state=state, stream=stream, lock=lock)


def _record(options: TrainOptions) -> dict:
    """The options that decide the run, as its marker records them."""
    same_tokenizer = CROSS_TOKENIZER_KEYS if options.cross_tokenizer is None else frozenset()
    return options_record(options, RESUME_SAFE | same_tokenizer)


def _claim_output(out: Path, record: dict):
    """Rank 0: create --out, take its lock (a second run into it is refused) and write its marker (a training
    run, with the options that decide it). Returns the open lock file."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = hold_lock(out, "training run")
        write_marker(out, "student", record)
    except (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        raise TrainError(f"{out}: cannot write there ({e.strerror}); choose a writable --out") from None
    return lock


# --------------------------------------------------------------------------------------------------------
# the loss of one micro-batch


def micro_batch_loss(model, batch: StudentBatch, weights: torch.Tensor, config: KDConfig, options: TrainOptions,
                     projector: HintProjector | None, teacher, device) -> tuple[torch.Tensor, dict]:
    """Loss of one micro-batch (already weighted by 1 / positions of the global step) and its parts."""
    if isinstance(batch, CrossBatch):   # --cross-tokenizer: the student's own tokens (student.cross_batch)
        return cross_batch_loss(model, batch, weights, config, options.cross_tokenizer, options.unaligned_ce_weight,
                                device)
    batch = batch.to(device)
    pos = batch.target_positions                               # (P,) flat b * T + t
    labels = batch.labels.reshape(-1)[pos]                     # (P,) next tokens
    targets = batch.sparse_targets()
    want_hidden = projector is not None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with autocast:
        if options.fused_head:
            out = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                   output_hidden_states=want_hidden)
            last = out.last_hidden_state
            hidden = last.reshape(-1, last.shape[-1])[pos]     # (P, H) final hidden states
            head = model.get_output_embeddings().weight
            total, ce, kd = fused_linear_sparse_kd(hidden.float(), head, targets, labels, weights, config,
                                                   options.chunk_size)
        else:
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        output_hidden_states=want_hidden)
            logits = out.logits.reshape(-1, out.logits.shape[-1])[pos].float()   # (P, V)
            if teacher is not None:
                total, ce, kd = online_kd_loss(teacher, batch.input_ids, batch.attention_mask, pos, logits, labels,
                                               weights, config)
            elif config.kd_weight == 0:   # the CE-only twin: plain cross-entropy, the cache's targets unused
                ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none").double()
                total = (weights * config.ce_weight * ce).sum().float()
                ce, kd = ce.detach(), torch.zeros_like(ce)
            else:
                total, ce, kd = sparse_kd_loss(logits, targets, labels, weights, config)
    parts = {"ce": float((weights * ce).sum()), "kd": float((weights * kd).sum())}
    if projector is not None:
        student_states = {s: out.hidden_states[s].reshape(-1, out.hidden_states[s].shape[-1])[pos]
                          for s, _ in projector.pairs}
        teacher_states = {t: batch.hidden[t] for _, t in projector.pairs}
        share = float(weights.sum())   # this micro-batch's share of the step's positions
        h = hint_loss(student_states, teacher_states, projector, options.hint.kind)
        parts["hint"] = float(h.detach()) * share
        total = total + options.hint.weight * share * h
    return total, parts


# --------------------------------------------------------------------------------------------------------
# the loop


def optimizer_step(run: Run) -> dict:
    """One optimizer step over ``grad_accum`` micro-batches; returns the step's metrics record."""
    options, device = run.options, run.device
    step_started = time.perf_counter()
    batches = [next(run.stream) for _ in range(options.schedule.grad_accum)]
    if not run.rest_checked:
        run.rest_checked = True
        _warn_rest_tempering(run, batches[0])
    count = torch.tensor([sum(b.num_positions for b in batches)], dtype=torch.float64)
    if run.world > 1:
        dist.all_reduce(count)     # positions of the global step
    run.optimizer.zero_grad(set_to_none=False)
    sums = dict.fromkeys(PARTS, 0.0)
    for batch in batches:
        if batch.num_positions == 0:
            continue
        weights = torch.full((batch.num_positions,), 1.0 / max(float(count), 1.0), dtype=torch.float64,
                             device=device)
        loss, parts = micro_batch_loss(run.model, batch, weights, run.config, options, run.projector, run.teacher,
                                       device)
        loss.backward()
        sums["loss"] += float(loss.detach())
        for k, v in parts.items():
            sums[k] += v
    if run.world > 1:
        _all_reduce_grads(run.params, sums)
    max_norm = options.schedule.max_grad_norm
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, max_norm or math.inf))   # clips only if asked
    finite = math.isfinite(sums["loss"]) and math.isfinite(grad_norm)
    if finite:
        run.optimizer.step()
        run.scheduler.step()
        run.nonfinite = 0
    else:
        run.optimizer.zero_grad(set_to_none=False)
        run.nonfinite += 1
    run.state.step += 1
    run.state.epoch, run.state.batches = run.stream.epoch, run.stream.batches
    if not finite:
        _refuse_nonfinite(run, sums["loss"], grad_norm)
    record = {"step": run.state.step, "lr": run.scheduler.get_last_lr()[0], **sums,
              "grad_norm": grad_norm if max_norm or not finite else None, "positions": int(count),
              "seconds": round(time.perf_counter() - step_started, 4)}
    if not finite:
        record["skipped"] = "non-finite loss or gradient: no update"
    return record


def _warn_rest_tempering(run: Run, batch: StudentBatch) -> None:
    """Warn once (rank 0) when tail ``rest`` meets T != 1, with what the first batch shows of the error."""
    config = run.config
    if config.temperature == 1.0 or config.tail != "rest" or config.loss == "sampled_ce" or run.rank != 0:
        return
    found = rest_tempering(batch.sparse_targets(), config.temperature, run.cache.layout.vocab_size)
    if not found["positions"]:
        return
    warnings.warn(f"--temperature {config.temperature:g} with --tail rest: the rest bucket (the teacher's mass outside "
                  f"the stored ids) is tempered as if it were one token. On the first batch it holds "
                  f"{found['approx']:.1%} of the tempered teacher mass on average, where the teacher's full "
                  f"distribution puts between {found['low']:.1%} and {found['high']:.1%} there (bounds from the "
                  f"stored probabilities, {found['positions']} positions). --tail renormalize or --temperature 1 "
                  "avoid the approximation; docs/targets.md has measured figures.", UserWarning, stacklevel=2)


def _refuse_nonfinite(run: Run, loss: float, grad_norm: float) -> None:
    """Stop the run (TrainError) once ``max_nonfinite_steps`` consecutive steps were non-finite; each such
    step was skipped without touching the weights, so the last checkpoint is still good."""
    allowed = run.options.max_nonfinite_steps
    if run.nonfinite < allowed:
        return
    last = latest_checkpoint(run.out)
    where = (f"the last good checkpoint is {last} (continue from it with --resume, after lowering the learning "
             "rate or checking the data)" if last is not None else
             "no checkpoint was written (use --checkpoint-every to keep some)")
    raise TrainError(f"step {run.state.step}: the loss ({loss}) or gradient norm ({grad_norm}) is not finite "
                     f"for {run.nonfinite} consecutive step(s) (--max-nonfinite-steps {allowed}); the run stopped "
                     f"without applying it and wrote no further checkpoint or model; {where}")


def _all_finite(params) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


def after_step(run: Run, record: dict, metrics) -> dict | None:
    """Evaluate, log and checkpoint as the options ask after a step; returns the evaluation, if one ran."""
    options, step = run.options, run.state.step
    last = step == options.schedule.steps
    result = None
    if options.eval.data and (last or (options.eval.every and step % options.eval.every == 0)):
        result = _evaluate(run)
        record["eval"] = result
        run.model.train()
    if metrics is not None and (step % options.log_every == 0 or result is not None or last):
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        if run.reporter is not None:
            run.reporter.log(record)
    if options.checkpoints.every and step % options.checkpoints.every == 0:
        if run.rank == 0:
            if not _all_finite(run.params):
                raise TrainError(f"step {step}: a weight is not finite; no checkpoint written (the last good one "
                                 f"is {latest_checkpoint(run.out)})")
            save_checkpoint(checkpoint_path(run.out, step), run.model, run.optimizer, run.scheduler, run.projector,
                            asdict(run.state))
            prune_checkpoints(run.out, options.checkpoints.keep)
        if run.world > 1:
            dist.barrier()
    return result


def train(options: TrainOptions) -> TrainResult:
    """Train a student from ``options.cache``; see the module docstring for what one step does."""
    started = time.perf_counter()
    out = Path(options.out)
    if options.checkpoints.resume and (out / SUMMARY_FILE).exists():
        # a complete run (killed while exiting, or resumed twice): nothing to redo, nothing rewritten
        check_output(out, "student", record=_record(options), resume=True)
        summary = json.loads((out / SUMMARY_FILE).read_text())
        return TrainResult(out=out, steps=summary["steps"], final_loss=summary["final_loss"], seconds=0.0,
                           eval=summary.get("eval"), complete=True)
    run = set_up(options)
    try:
        return _train(run, started)
    finally:
        if run.reporter is not None:
            run.reporter.close()
        if run.lock is not None:
            run.lock.close()


def _train(run: Run, started: float) -> TrainResult:
    options = run.options
    if run.rank == 0:
        _truncate_metrics(run.out / METRICS_FILE, run.state.step)
    metrics = open(run.out / METRICS_FILE, "a") if run.rank == 0 else None
    run.reporter = open_reporter(options, run.out, run.state.step) if run.rank == 0 else None
    bar = _progress(options, run.state.step, run.rank)
    last_loss, last_eval = float("nan"), None
    run.model.train()
    while run.state.step < options.schedule.steps:
        record = optimizer_step(run)
        last_loss = record["loss"]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}")
        evaluated = after_step(run, record, metrics)
        if evaluated is not None:
            last_eval = evaluated
    if bar is not None:
        bar.close()
    if metrics is not None:
        metrics.close()
    seconds = time.perf_counter() - started
    if run.rank == 0:
        _save_final(run, last_loss, last_eval, seconds)
    if run.world > 1:
        dist.barrier()
    return TrainResult(out=run.out, steps=run.state.step, final_loss=last_loss, seconds=seconds, eval=last_eval)


# --------------------------------------------------------------------------------------------------------
# helpers of the loop


def _all_reduce_grads(params, sums: dict) -> None:
    """Sum gradients and the logged loss terms over ranks."""
    for p in params:
        if p.grad is None:   # a rank whose micro-batches held no target position still takes part
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
    totals = torch.tensor([sums[k] for k in PARTS], dtype=torch.float64)
    dist.all_reduce(totals)
    for k, v in zip(PARTS, totals.tolist()):
        sums[k] = v


def _evaluate(run: Run) -> dict:
    """Rank 0 evaluates on ``--eval-data``; every rank gets the result."""
    options, config = run.options, run.config
    result = None
    if run.rank == 0:
        result = evaluate_model(run.model, options.eval.data, run.tokenizer, batch_size=options.schedule.batch_size,
                                seq_len=options.eval.seq_len, max_rows=options.eval.rows,
                                kd_config=KDConfig(loss=config.loss, tail=config.tail), device=run.device).to_dict()
    if run.world > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def _progress(options: TrainOptions, start: int, rank: int):
    if not options.progress or rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=options.schedule.steps, initial=start, unit="step", dynamic_ncols=True)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics of steps up to ``step`` (the checkpoint resumed from; 0: none): the steps a killed
    run logged after its last checkpoint are run again and logged again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if (logged := _step_of(line)) is not None and logged <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None   # a line cut short by a kill


def _save_final(run: Run, last_loss: float, last_eval: dict | None, seconds: float) -> None:
    """The student (safetensors), its tokenizer, φ and training_summary.json in the output directory."""
    out, options, cache = run.out, run.options, run.cache
    if not _all_finite(run.params):
        raise TrainError(f"step {run.state.step}: a weight is not finite; the student was not saved")
    run.model.save_pretrained(out, safe_serialization=True)
    run.tokenizer.save_pretrained(out)
    if run.projector is not None:
        from safetensors.torch import save_model

        save_model(run.projector, str(out / "hint_projector.safetensors"))
    summary = {"options": asdict(options), "steps": run.state.step, "final_loss": last_loss, "eval": last_eval,
               "seconds": round(seconds, 2), "cache": cache.location,
               "cache_fingerprint": cache.manifest.tokenizer.fingerprint,
               "kd": asdict(run.config)}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
