"""Train a student from a cache alone: ``train(TrainOptions(...))`` or ``teachercache train``.

One optimizer step:

1. take ``grad_accum`` micro-batches of ``batch_size`` rows from this rank's share of the cache;
2. count the target positions of the whole step over all micro-batches and ranks (one all-reduce), so
   every position weighs 1 / (positions in the global step) whatever the split;
3. per micro-batch: forward the student, loss = ce_alpha·CE + kd_alpha·T²·KD (+ hint_alpha·hint),
   backward (the KD kernels of teachercache.kernels; with ``fused_head`` the LM head and the loss run
   chunk by chunk and the [B, T, V] logits never exist);
4. sum gradients over ranks (all-reduce; the weights of step 2 make it the global mean), clip, AdamW,
   warmup + cosine schedule;
5. every ``eval_every`` steps evaluate (student.evaluate), every ``checkpoint_every`` steps write a
   checkpoint (model, optimizer, schedule, RNG, data position, φ: safetensors + JSON, no pickle).

At the end the student is saved with ``save_pretrained`` (safetensors) beside its tokenizer, φ (when
hints are used) and ``training_summary.json``; metrics go to ``metrics.jsonl``.

Multi-process: run under ``torchrun``; the gloo backend on CPU, NCCL on CUDA. Gradients are summed with
explicit all-reduces rather than a DistributedDataParallel wrapper, so the fused-head path (which calls
the model's body and head separately) needs no special casing; only rank 0 writes files.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from teachercache.cache import Cache
from teachercache.errors import TeachercacheError
from teachercache.kernels import KDConfig, SparseTargets, fused_linear_sparse_kd, sparse_kd_loss
from teachercache.manifest import TOKENIZER_DIR, tokenizer_fingerprint

from .hint import HintProjector, hint_loss, parse_layer_map, resolve_layer_map

PRESETS = {
    # small Llama-style students; vocab_size comes from the cache
    "llama-tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2),
    "llama-small": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2),
    "llama-base": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8,
                       num_key_value_heads=4),
}
CHECKPOINTS_DIR = "checkpoints"


class TrainError(TeachercacheError):
    """A training run cannot start: the student, the cache or the options do not fit together."""


@dataclass(frozen=True)
class TrainOptions:
    cache: str
    student: str
    out: str
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    kd_loss: str | None = None          # None: sampled_ce for sampled caches, forward_kl otherwise
    tail: str = "rest"
    temperature: float = 1.0
    beta: float = 0.5
    skew_alpha: float = 0.1
    ce_alpha: float = 0.0
    kd_alpha: float = 1.0
    hint_layers: str = ""
    hint_alpha: float = 1.0
    hint_kind: str = "mse"
    fused_head: bool = False
    chunk_size: int = 1024
    eval_data: str | None = None
    eval_every: int = 0
    eval_rows: int | None = None
    eval_seq_len: int = 512
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 1024
    num_workers: int = 0
    log_every: int = 10
    online_teacher: str | None = None
    device: str = "auto"
    trust_remote_code: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    out: Path
    steps: int
    final_loss: float
    seconds: float
    eval: dict | None


# --------------------------------------------------------------------------------------------------------
# set-up


def _distributed() -> tuple[int, int]:
    """(rank, world) from torchrun's environment; initialises the process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if world > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(choice: str, rank: int) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainError("--device cuda, but torch sees no CUDA device")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())


def load_tokenizer(student: str, cache: Cache, trust_remote_code: bool = False):
    """The student's own tokenizer when its directory has one, else the copy stored in the cache."""
    from transformers import AutoTokenizer

    path = Path(student)
    own = path.is_dir() and any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    source = path if own else cache.path / TOKENIZER_DIR
    if not own and not source.is_dir():
        raise TrainError(f"{cache.path}: the cache has no {TOKENIZER_DIR}/ and {student} brings no tokenizer")
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)


def load_student(spec: str, vocab_size: int, trust_remote_code: bool = False):
    """A pretrained path/hub id, a config json (fresh weights), or a preset name (fresh weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if spec in PRESETS:
        config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=4096, tie_word_embeddings=True,
                             **PRESETS[spec])
        return AutoModelForCausalLM.from_config(config)
    path = Path(spec)
    if path.suffix == ".json" and path.is_file():
        try:
            values = json.loads(path.read_text())
            values.setdefault("vocab_size", vocab_size)
            config = AutoConfig.for_model(**values)
        except (ValueError, KeyError, TypeError) as e:
            raise TrainError(f"{path}: not a model config a transformers Auto class can read ({e}); it needs "
                             "a model_type such as \"llama\"") from None
        return AutoModelForCausalLM.from_config(config)
    if not path.exists() and os.environ.get("HF_HUB_OFFLINE") == "1" and "/" not in spec:
        raise TrainError(f"--student {spec}: no such file, directory or preset "
                         f"(presets: {', '.join(PRESETS)})")
    try:
        return AutoModelForCausalLM.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise TrainError(f"--student {spec}: cannot load a model from it ({e}); give a directory, a hub id, "
                         f"a config .json or a preset ({', '.join(PRESETS)})") from None


def check_student(model, tokenizer, cache: Cache, hint_pairs) -> None:
    """Tokenizer fingerprint, output size and hint layers, before any step runs."""
    want = cache.manifest.tokenizer.fingerprint
    got = tokenizer_fingerprint(tokenizer)
    if got != want:
        raise TrainError(f"{cache.path}: the student's tokenizer (fingerprint {got[:12]}) is not the one the "
                         f"cache was built with ({want[:12]}): train a student that shares the teacher's "
                         "tokenizer, or rebuild the cache")
    out_size = model.get_output_embeddings().weight.shape[0]
    if out_size < cache.layout.vocab_size:
        raise TrainError(f"{cache.path}: stored ids go up to {cache.layout.vocab_size - 1}, but the student's "
                         f"output has only {out_size} columns (a padded vocabulary may be larger, not smaller)")
    if hint_pairs:
        resolve_layer_map(hint_pairs, student_layers=model.config.num_hidden_layers,
                          cache_layers=tuple(cache.layout.hidden_layers), cache=str(cache.path))


def kd_config(options: TrainOptions, sampled: bool) -> KDConfig:
    loss = options.kd_loss or ("sampled_ce" if sampled else "forward_kl")
    if loss == "sampled_ce" and not sampled:
        raise TrainError("--kd-loss sampled_ce needs a cache of sampled targets (build with --target sample)")
    try:
        return KDConfig(loss=loss, tail=options.tail, temperature=options.temperature, beta=options.beta,
                        alpha=options.skew_alpha, ce_weight=options.ce_alpha, kd_weight=options.kd_alpha)
    except ValueError as e:  # --temperature, --beta, --skew-alpha out of range
        raise TrainError(f"KD options: {e} (see teachercache train --help)") from None


def lr_lambda(options: TrainOptions):
    """Linear warmup to lr, then cosine down to min_lr_ratio × lr at the last step."""
    def f(step: int) -> float:
        if step < options.warmup_steps:
            return (step + 1) / options.warmup_steps
        span = max(1, options.steps - options.warmup_steps)
        progress = min(1.0, (step - options.warmup_steps) / span)
        return options.min_lr_ratio + (1 - options.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


# --------------------------------------------------------------------------------------------------------
# the loss of one micro-batch


def batch_targets(batch: dict, device) -> SparseTargets:
    return SparseTargets(batch["target_offsets"], batch["target_ids"], batch["target_logprobs"],
                         batch["rest_mass"], batch.get("target_counts")).to(device)


def micro_batch_loss(model, batch: dict, weights: torch.Tensor, config: KDConfig, options: TrainOptions,
                     projector: HintProjector | None, teacher, device) -> tuple[torch.Tensor, dict]:
    """Loss of one micro-batch (already weighted by 1 / positions of the global step) and its parts."""
    input_ids = batch["input_ids"].to(device)
    attention = batch["attention_mask"].to(device)
    pos = batch["target_positions"].to(device)
    labels = batch["labels"].reshape(-1).to(device)[pos]
    targets = batch_targets(batch, device)
    want_hidden = projector is not None
    parts = {}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _nullcontext()
    with autocast:
        if options.fused_head:
            out = model.base_model(input_ids=input_ids, attention_mask=attention, output_hidden_states=want_hidden)
            last = out.last_hidden_state
            hidden = last.reshape(-1, last.shape[-1])[pos]
            head = model.get_output_embeddings().weight
            total, ce, kd = fused_linear_sparse_kd(hidden.float(), head, targets, labels, weights, config,
                                                   options.chunk_size)
        else:
            out = model(input_ids=input_ids, attention_mask=attention, output_hidden_states=want_hidden)
            logits = out.logits.reshape(-1, out.logits.shape[-1])[pos].float()
            if teacher is not None:
                total, ce, kd = online_kd_loss(teacher, input_ids, attention, pos, logits, labels, weights, config)
            elif config.kd_weight == 0:   # the CE-only twin: plain cross-entropy, the cache's targets unused
                ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none").double()
                total = (weights * config.ce_weight * ce).sum().float()
                ce, kd = ce.detach(), torch.zeros_like(ce)
            else:
                total, ce, kd = sparse_kd_loss(logits, targets, labels, weights, config)
    parts["ce"] = float((weights * ce).sum())
    parts["kd"] = float((weights * kd).sum())
    if projector is not None:
        student_states = {s: out.hidden_states[s].reshape(-1, out.hidden_states[s].shape[-1])[pos]
                          for s, _ in projector.pairs}
        teacher_states = {t: batch["hidden"][t].to(device) for _, t in projector.pairs}
        share = float(weights.sum())   # this micro-batch's share of the step's positions
        h = hint_loss(student_states, teacher_states, projector, options.hint_kind)
        parts["hint"] = float(h.detach()) * share
        total = total + options.hint_alpha * share * h
    return total, parts


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@torch.no_grad()
def _teacher_logprobs(teacher, input_ids, attention, pos, vocab: int, temperature: float) -> torch.Tensor:
    logits = teacher(input_ids=input_ids, attention_mask=attention).logits
    z = logits.reshape(-1, logits.shape[-1])[pos][:, :vocab].float()
    return torch.log_softmax(z / temperature, -1)


def online_kd_loss(teacher, input_ids, attention, pos, logits, labels, weights, config: KDConfig):
    """The baseline the cache is measured against: forward KL to the live teacher's full distribution
    (over the tokenizer's ids, as a cache would store them: padding columns of the output are dropped)."""
    logp = _teacher_logprobs(teacher, input_ids, attention, pos, teacher.tokenizer_vocab, config.temperature)
    t = config.temperature
    logq = torch.log_softmax(logits / t, -1)
    kd = (logp.exp() * (logp - logq[:, :logp.shape[1]])).sum(-1).double()
    ce = -torch.log_softmax(logits, -1).gather(1, labels[:, None])[:, 0].double()
    w = weights.double()
    total = (w * (config.ce_weight * ce + config.kd_weight * t * t * kd)).sum()
    return total.float(), ce.detach(), kd.detach()


# --------------------------------------------------------------------------------------------------------
# checkpoints: safetensors + JSON


def save_checkpoint(path: Path, model, optimizer, scheduler, projector, state: dict) -> None:
    """Everything a resume needs, in a directory written under a temporary name and renamed."""
    from safetensors.torch import save_file, save_model

    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    if projector is not None:
        save_model(projector, str(tmp / "projector.safetensors"))
    opt = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.contiguous() for i, s in opt["state"].items() for k, v in s.items()
               if torch.is_tensor(v)}
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    meta = {"state": state, "param_groups": opt["param_groups"], "scheduler": scheduler.state_dict(),
            "numpy_rng": _jsonable(np.random.get_state()), "python_rng": _jsonable(random.getstate())}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    return x


def load_checkpoint(path: Path, model, optimizer, scheduler, projector) -> dict:
    from safetensors.torch import load_file, load_model

    load_model(model, str(path / "model.safetensors"))
    if projector is not None:
        load_model(projector, str(path / "projector.safetensors"))
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    state: dict = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    np_state = meta["numpy_rng"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    py_state = meta["python_rng"]
    random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))
    return meta["state"]


def latest_checkpoint(out: Path) -> Path | None:
    root = out / CHECKPOINTS_DIR
    found = sorted(root.glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1])) if root.is_dir() else []
    return found[-1] if found else None


# --------------------------------------------------------------------------------------------------------
# the loop


def train(options: TrainOptions) -> TrainResult:
    """Train a student from ``options.cache``; see the module docstring for what one step does."""
    from .data import CacheDataset, collate_rows, make_loader

    started = time.perf_counter()
    rank, world = _distributed()
    device = _device(options.device, rank)
    torch.manual_seed(options.seed)
    random.seed(options.seed)
    np.random.seed(options.seed)
    out = Path(options.out)
    cache = Cache.open(options.cache)
    config = kd_config(options, cache.layout.sampled)
    tokenizer = load_tokenizer(options.student, cache, options.trust_remote_code)
    model = load_student(options.student, cache.layout.vocab_size, options.trust_remote_code).to(device)
    hint_pairs = parse_layer_map(options.hint_layers) if options.hint_layers else []
    check_student(model, tokenizer, cache, hint_pairs)
    if options.fused_head:
        _check_fusable(model)
    projector = None
    if hint_pairs:
        projector = HintProjector(hint_pairs, model.config.hidden_size, cache.layout.hidden_width).to(device)
    teacher = _load_online_teacher(options, config, cache.layout.vocab_size, device) if options.online_teacher else None
    if out.exists() and any(out.iterdir()) and not options.resume:
        raise TrainError(f"{out}: the output directory is not empty (use --resume to continue a run, or "
                         "choose another --out)")
    if world > 1:
        dist.barrier()   # every rank has looked at --out before rank 0 writes into it

    params = list(model.parameters()) + (list(projector.parameters()) if projector is not None else [])
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(options))
    state = {"step": 0, "epoch": 0, "batches": 0}
    checkpoint = latest_checkpoint(out) if options.resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, projector)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    dataset = CacheDataset(cache.path, rank=rank, world_size=world, seed=options.seed, shuffle=options.shuffle,
                           shuffle_buffer=options.shuffle_buffer,
                           hidden_layers=sorted({t for _, t in hint_pairs}))
    stream = BatchStream(dataset, options, partial(collate_rows, pad_id=pad), make_loader, state["epoch"],
                         state["batches"])

    if rank == 0:
        _truncate_metrics(out / "metrics.jsonl", state["step"])
    metrics = open(out / "metrics.jsonl", "a") if rank == 0 else None
    bar = _progress(options, state["step"], rank)
    last_loss, last_eval = float("nan"), None
    model.train()
    while state["step"] < options.steps:
        step_started = time.perf_counter()
        batches = [next(stream) for _ in range(options.grad_accum)]
        count = torch.tensor([sum(b["target_positions"].numel() for b in batches)], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(count)
        optimizer.zero_grad(set_to_none=False)
        sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "hint": 0.0}
        for batch in batches:
            n = batch["target_positions"].numel()
            weights = torch.full((n,), 1.0 / max(float(count), 1.0), dtype=torch.float64, device=device)
            if n == 0:
                continue
            loss, parts = micro_batch_loss(model, batch, weights, config, options, projector, teacher, device)
            loss.backward()
            sums["loss"] += float(loss.detach())
            for k, v in parts.items():
                sums[k] += v
        if world > 1:
            _all_reduce_grads(params, sums)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm) if options.max_grad_norm else None
        optimizer.step()
        scheduler.step()
        state["step"] += 1
        state["epoch"], state["batches"] = stream.epoch, stream.batches
        last_loss = sums["loss"]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}")
        record = {"step": state["step"], "lr": scheduler.get_last_lr()[0], **sums,
                  "grad_norm": None if grad_norm is None else float(grad_norm), "positions": int(count),
                  "seconds": round(time.perf_counter() - step_started, 4)}
        evaluate_now = options.eval_data and options.eval_every and (
            state["step"] % options.eval_every == 0 or state["step"] == options.steps)
        if evaluate_now:
            last_eval = _evaluate(model, options, tokenizer, config, device, rank, world)
            record["eval"] = last_eval
            model.train()
        if metrics is not None and (state["step"] % options.log_every == 0 or evaluate_now
                                    or state["step"] == options.steps):
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if options.checkpoint_every and state["step"] % options.checkpoint_every == 0:
            if rank == 0:
                save_checkpoint(out / CHECKPOINTS_DIR / f"step-{state['step']}", model, optimizer, scheduler,
                                projector, dict(state))
                _prune_checkpoints(out, options.keep_checkpoints)
            if world > 1:
                dist.barrier()
    if bar is not None:
        bar.close()
    if metrics is not None:
        metrics.close()
    seconds = time.perf_counter() - started
    if rank == 0:
        _save_final(out, model, tokenizer, projector, options, cache, state, last_loss, last_eval, seconds)
    if world > 1:
        dist.barrier()
    return TrainResult(out=out, steps=state["step"], final_loss=last_loss, seconds=seconds, eval=last_eval)


class BatchStream:
    """Endless micro-batches, epoch after epoch, from a saved data position on. ``epoch`` and ``batches``
    (micro-batches delivered in that epoch) are what a checkpoint stores to resume exactly here."""

    def __init__(self, dataset, options: TrainOptions, collate, make_loader, epoch: int = 0, batches: int = 0):
        self.dataset, self.options, self.collate, self.make_loader = dataset, options, collate, make_loader
        self.epoch, self.batches = epoch, batches
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            if self._it is None:
                self.dataset.set_epoch(self.epoch)
                self.dataset.set_position(self.epoch, self.batches, self.options.batch_size)
                self._it = iter(self.make_loader(self.dataset, self.options.batch_size, self.options.num_workers,
                                                 self.collate))
            try:
                batch = next(self._it)
            except StopIteration:
                if self.batches == 0:
                    raise TrainError(f"{self.options.cache}: this rank's share of the cache holds no rows") from None
                self.epoch, self.batches, self._it = self.epoch + 1, 0, None
                continue
            self.batches += 1
            return batch


def _all_reduce_grads(params, sums: dict) -> None:
    for p in params:
        if p.grad is None:   # a rank whose micro-batches held no target position still takes part
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
    totals = torch.tensor([sums[k] for k in ("loss", "ce", "kd", "hint")], dtype=torch.float64)
    dist.all_reduce(totals)
    for k, v in zip(("loss", "ce", "kd", "hint"), totals.tolist()):
        sums[k] = v


def _check_fusable(model) -> None:
    cfg = model.config
    for attr in ("final_logit_softcapping", "logit_scale"):
        value = getattr(cfg, attr, None)
        if value not in (None, 1, 1.0):
            raise TrainError(f"--fused-head: the student's config sets {attr}={value}, which the chunked head "
                             "does not apply; train without --fused-head")
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise TrainError("--fused-head: the student's LM head has a bias; train without --fused-head")


def _load_online_teacher(options: TrainOptions, config: KDConfig, vocab: int, device):
    from transformers import AutoModelForCausalLM

    if config.loss != "forward_kl" or options.fused_head:
        raise TrainError("--online-teacher computes forward_kl over the full vocabulary, without --fused-head")
    try:
        teacher = AutoModelForCausalLM.from_pretrained(options.online_teacher,
                                                       trust_remote_code=options.trust_remote_code).to(device)
    except OSError as e:
        raise TrainError(f"--online-teacher {options.online_teacher}: cannot load it ({e})") from None
    teacher.tokenizer_vocab = vocab
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _evaluate(model, options: TrainOptions, tokenizer, config: KDConfig, device, rank: int, world: int):
    from .evaluate import evaluate_model

    result = None
    if rank == 0:
        result = evaluate_model(model, options.eval_data, tokenizer, batch_size=options.batch_size,
                                seq_len=options.eval_seq_len, max_rows=options.eval_rows,
                                kd_config=KDConfig(loss=config.loss, tail=config.tail), device=device).to_dict()
    if world > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def _progress(options: TrainOptions, start: int, rank: int):
    if not options.progress or rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=options.steps, initial=start, unit="step", dynamic_ncols=True)


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


def _prune_checkpoints(out: Path, keep: int) -> None:
    root = out / CHECKPOINTS_DIR
    found = sorted(root.glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    for old in found[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _save_final(out: Path, model, tokenizer, projector, options, cache, state, last_loss, last_eval, seconds):
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if projector is not None:
        from safetensors.torch import save_model

        save_model(projector, str(out / "hint_projector.safetensors"))
    summary = {"options": asdict(options), "steps": state["step"], "final_loss": last_loss, "eval": last_eval,
               "seconds": round(seconds, 2), "cache": str(cache.path),
               "cache_fingerprint": cache.manifest.tokenizer.fingerprint,
               "kd": asdict(kd_config(options, cache.layout.sampled))}
    (out / "training_summary.json").write_text(json.dumps(summary, indent=1))
