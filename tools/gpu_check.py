"""The GPU check of issue 20 (item 5): one script, under 10 minutes on one GPU, ending with one JSON line.

(a) correctness: the device's path against the CPU's on the same inputs, and each against a dense float64
    computation written out here (independent of the library's own references):
    * top-k and nucleus targets of the same bf16-valued logits (ties included, padding columns beyond the
      tokenizer): the torch path on the device vs the numba pass on CPU. Each path's ids must be a true
      top-n of the float64 log-softmax (ties: any of the tied ids), its log-probs, label log-prob and rest
      mass within 1e-4 of float64 (entropy: two 1/1024-nat steps of its stored code); the two paths'
      sorted log-probs within 1e-4 of each other and their codec codes at most one quantiser step apart;
      nucleus sizes equal but where the float64 cumulative mass lies within 1e-5 of top_p.
    * sampled targets. A device's generator gives another stream than the CPU's for the same seed, so a
      sampled cache built on a GPU is not the one built on CPU: the check does not ask for equal draws
      from equal seeds. Instead (i) the same uniforms, given to both paths, must give draws that are the
      float64 inverse CDF of those uniforms, up to 1e-5 of a CDF boundary (the draws of the two paths
      then agree but for uniforms on a boundary: the share reported); (ii) each path's own seeded stream
      (position_uniforms on its device) must pass a Kolmogorov-Smirnov test (alpha = 0.001) of the
      randomised probability integral transform of its draws under the float64 distribution: uniform iff
      the draws follow the teacher's distribution. The overlap of the two streams' supports is reported.
    * sparse KD losses and gradients (forward KL with the rest bucket and renormalised at T = 2, reverse
      KL, sampled CE; CE mixed in; k = 1 rows, rest 0, a confident student with logit gap 40, a stored id
      100 nats down, weight 0, an ignored label): the torch backend on the device vs the numba kernel on
      CPU, each against float64 with test_loss_edges' tolerances (total rtol 1e-5; gradient relative
      error <= 1e-4 at entries >= 1e-6 of their row's largest, absolute <= 1e-9 s_i + 1e-4 |want|).
    * the fused LM head against the unfused one (logits = hidden @ weight.T, then the same loss) on the
      device and against float64: loss rtol 1e-5, gradients of hidden and weight within 1e-4 of the
      largest entry of each.
    With --device cpu the "device" is the CPU too (the torch backend against the numba one).
(b) build overhead: a random ~1B Llama (hidden 2048, 16 layers, vocab 152,064; bf16 on a GPU, fp32 on CPU)
    saved beside a word-level tokenizer of as many tokens, over a jsonl corpus of random words that packs
    into rows of 4096 tokens: the bare forward a user would run (model(input_ids).logits.float().sum(), the
    rows read and tokenized the same way) against build_cache end to end (top-64 targets, shards,
    manifest), minus its load time (BuildResult.load_seconds). Best of --repeats, alternating. Target:
    build / forward <= 1.05.
(c) training step: a cached top-64 KD step against a CE-only step (set_up + optimizer_step of
    student.train, the same student, seed and rows, from the cache built in (b)), a 192M-parameter student
    on a GPU; the modes' steps interleaved after warm-ups, the fastest of each counts. Target: KD / CE <=
    1.10. The fused head's extra peak GPU memory in a step (torch.cuda.max_memory_allocated minus what was
    allocated before it) against the unfused KD step's; null on CPU.

    python tools/gpu_check.py                        # on the lent GPU (H100 / H200)
    python tools/gpu_check.py --device cpu --small   # anywhere: tiny sizes, ~20 s on 2 vCPUs (tests/test_gpu_check.py)

Every size is a flag (--small changes the defaults only). --budget-s (default 480) skips the parts that
would not fit, with a note in the JSON; a watchdog prints what was measured and exits (code 2) if a part
overruns the budget by a minute, so the run never lasts more than 9 minutes. A part that raises is
recorded as {"error": ..., "pass": false} and the others still run. Exit code 1 when a correctness check
fails; performance targets are reported (target_met), never turned into a failure.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")      # nothing is downloaded: every model and tokenizer is made here
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numba
import numpy as np
import torch
import transformers

from teachercache.student.fused_head import fused_linear_sparse_kd
from teachercache.student.kd_types import IGNORE_INDEX, PROB_FLOOR, KDConfig, SparseTargets
from teachercache.student.losses import sparse_kd_loss
from teachercache.cli.options import field_docs
from teachercache.format.manifest import TargetSpec
from teachercache.format.quantizer import logprob_table, quantize_reference
from teachercache.format.schema import Quantizer
from teachercache.runtime import resolve_device, resolve_dtype
from teachercache.teacher.targets import position_targets, position_uniforms

LP_TOL = 1e-4
"""Stored, label log-probs and rest mass against float64, and between the two paths (nats)."""
ENTROPY_TOL = 2 / 1024
"""Entropy against float64 (nats): two steps of the code the cache stores it in (nats16, 1/1024 nats). The
torch path forms sum_v p_v x_v as one float32 dot product over the vocabulary: up to ~1e-3 nats off at
V = 152k (seen on CPU), where the numba pass is within 1e-6."""
CDF_TOL = 1e-5
"""Sampled draws: how far (in probability) a uniform may lie outside its id's float64 CDF interval."""
NUCLEUS_EDGE = 1e-5
"""Nucleus: sizes may differ where the float64 cumulative mass lies this close to top_p."""
KS_CRITICAL = 1.949
"""Kolmogorov-Smirnov critical value x sqrt(n) at alpha = 0.001."""
LOSS_RTOL, GRAD_REL = 1e-5, 1e-4
"""test_loss_edges' tolerances: the total against float64, the gradient's relative error."""
TARGETS = {"build_over_forward": 1.05, "kd_over_ce": 1.10}


@dataclass(frozen=True)
class Sizes:
    """Every size of the check; the defaults are the GPU run's, SMALL the CPU smoke run's."""

    vocab: int = 152_064
    """Vocabulary of the teacher, the tokenizer, the student and the correctness checks."""
    teacher_hidden: int = 2048
    """Teacher hidden size (~1.07B parameters with the defaults, embeddings tied)."""
    teacher_layers: int = 16
    """Teacher decoder layers."""
    teacher_intermediate: int = 5632
    """Teacher MLP width."""
    teacher_heads: int = 16
    """Teacher attention heads."""
    teacher_kv_heads: int = 8
    """Teacher key/value heads."""
    seq_len: int = 4096
    """Tokens per row of the build (and of the student's rows)."""
    build_rows: int = 64
    """Rows of the synthetic corpus."""
    build_batch: int = 4
    """Rows per forward (the build's --batch-size)."""
    k: int = 64
    """Top-k of the targets and of the build."""
    student_hidden: int = 768
    """Student hidden size (192M parameters with the defaults, embeddings tied)."""
    student_layers: int = 12
    """Student decoder layers."""
    student_intermediate: int = 2048
    """Student MLP width."""
    student_heads: int = 12
    """Student attention heads."""
    student_kv_heads: int = 4
    """Student key/value heads."""
    student_batch: int = 2
    """Rows per training step."""
    warmup_steps: int = 2
    """Untimed training steps per mode."""
    timed_steps: int = 6
    """Timed training steps per mode (the fastest counts)."""
    positions: int = 256
    """Positions of the correctness checks."""
    samples: int = 64
    """Draws per position of the sampled-target checks."""
    repeats: int = 3
    """Repeats of the bare forward and of the build (the fastest counts)."""


SMALL = Sizes(vocab=4096, teacher_hidden=64, teacher_layers=2, teacher_intermediate=176, teacher_heads=4,
              teacher_kv_heads=2, seq_len=128, build_rows=8, build_batch=4, student_hidden=64, student_layers=2,
              student_intermediate=176, student_heads=4, student_kv_heads=2, student_batch=2, warmup_steps=1,
              timed_steps=2, positions=64, repeats=2)


# --------------------------------------------------------------------------------------------------------
# timing, budget and the report


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Report:
    """The JSON the script ends with; printed once, by the main thread or by the watchdog."""

    def __init__(self, budget_s: float):
        self.started = time.perf_counter()
        self.budget_s = budget_s
        self.data: dict = {"check": "gpu", "notes": []}
        self.part = "start"
        self._printed = threading.Lock()

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def emit(self) -> None:
        if not self._printed.acquire(blocking=False):
            return
        self.data["total_s"] = round(time.perf_counter() - self.started, 2)
        print(json.dumps(self.data, default=lambda o: o.item()), flush=True)   # numpy scalars

    def watchdog(self, grace_s: float = 60.0) -> threading.Timer:
        """Print what was measured and exit (code 2) once the budget is overrun by ``grace_s``."""
        def fire():
            self.data["aborted"] = f"the time budget ({self.budget_s:g} s) ran out in part {self.part!r}"
            self.data["all_correct"] = False
            self.emit()
            os._exit(2)
        timer = threading.Timer(max(self.budget_s + grace_s, 1.0), fire)
        timer.daemon = True
        timer.start()
        return timer


# --------------------------------------------------------------------------------------------------------
# (a) correctness: targets


def teacher_logits(n: int, vocab: int, pad: int, seed: int) -> torch.Tensor:
    """(n, vocab + pad) float32 logits with bf16 values (as a bf16 teacher gives them: ties are common), a
    peaked distribution (sigma 7); row 0 has 100 ids tied at the top, row 1 is flat (every id tied); the
    ``pad`` columns past the tokenizer are the row's largest and must never be stored."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab + pad, generator=g) * 7
    x[0, :100] = x[0].max() + 1
    x[1] = 0.0
    x[:, vocab:] = x.max() + 5
    return x.bfloat16().float()


def dense_logprobs(logits: torch.Tensor, vocab: int) -> np.ndarray:
    return torch.log_softmax(logits[:, :vocab].double(), -1).numpy()


def csr(t, n: int):
    """[(ids, logprobs, counts or None)] per position of a TargetArrays."""
    o = t.target_offsets
    return [(t.target_ids[o[i]:o[i + 1]].astype(np.int64), t.target_logprobs[o[i]:o[i + 1]],
             None if t.target_counts is None else t.target_counts[o[i]:o[i + 1]]) for i in range(n)]


def path_errors(t, ref: np.ndarray, labels: np.ndarray, spec: TargetSpec) -> dict:
    """One path's targets against the float64 log-softmax ``ref`` (n, V): wrong id sets (not a top-n, ties
    allowed), nucleus sizes off outside the top_p edge, and the largest errors of the stored values."""
    n, vocab = ref.shape
    wrong_ids = wrong_size = edge = 0
    lp_err = rest_err = 0.0
    for i, (ids, lps, _) in enumerate(csr(t, n)):
        order = np.sort(ref[i])[::-1]
        m = len(ids)
        if len(set(ids.tolist())) != m or (ids >= vocab).any() or not np.array_equal(np.sort(ref[i, ids])[::-1],
                                                                                       order[:m]):
            wrong_ids += 1
            continue
        if spec.kind == "topk":
            wrong_size += m != spec.k
        else:
            mass = np.cumsum(np.exp(order[:spec.max_k]))
            want = int(np.clip((mass < spec.top_p).sum() + 1, spec.min_k, spec.max_k))
            near = min(abs(mass[min(m, want) - 1] - spec.top_p), abs(mass[max(m, want) - 2] - spec.top_p)) \
                if max(m, want) >= 2 else 1.0
            at_edge = abs(m - want) == 1 and near <= NUCLEUS_EDGE
            edge += m != want and at_edge
            wrong_size += m != want and not at_edge
        lp_err = max(lp_err, float(np.abs(lps - ref[i, ids]).max()))
        rest_err = max(rest_err, abs(float(t.rest_mass[i]) - max(0.0, 1.0 - float(np.exp(ref[i, ids]).sum()))))
    label_err = float(np.abs(t.label_logprob - ref[np.arange(n), labels]).max())
    entropy = -(np.exp(ref) * ref).sum(1)
    entropy_err = float(np.abs(t.entropy - entropy).max())
    return {"wrong_id_sets": wrong_ids, "wrong_sizes": wrong_size, "sizes_off_at_top_p_edge": edge,
            "max_logprob_err": lp_err, "max_label_logprob_err": label_err, "max_rest_err": rest_err,
            "max_entropy_err": entropy_err,
            "pass": wrong_ids == 0 and wrong_size == 0 and max(lp_err, label_err, rest_err) <= LP_TOL
            and entropy_err <= ENTROPY_TOL}


def between_paths(dev, cpu, n: int, spec: TargetSpec) -> dict:
    """The two paths against each other: identical id sets (share), sorted log-probs within LP_TOL, codec codes
    at most one quantiser step apart."""
    q = Quantizer()
    table = logprob_table(q)
    same_ids, lp_diff, code_diff, decoded_diff, sizes_differ = 0, 0.0, 0, 0.0, 0
    for (ia, la, _), (ib, lb, _) in zip(csr(dev, n), csr(cpu, n)):
        if len(ia) != len(ib):
            sizes_differ += 1       # a nucleus edge case: path_errors has judged each size on its own
            continue
        same_ids += set(ia.tolist()) == set(ib.tolist())
        a, b = np.sort(la)[::-1], np.sort(lb)[::-1]
        lp_diff = max(lp_diff, float(np.abs(a - b).max()))
        ca, cb = quantize_reference(a, q), quantize_reference(b, q)
        code_diff = max(code_diff, int(np.abs(ca - cb).max()))
        decoded_diff = max(decoded_diff, float(np.abs(table[ca] - table[cb]).max()))
    return {"same_id_sets": same_ids / n, "sizes_differ": sizes_differ, "max_logprob_diff": lp_diff,
            "max_code_diff": code_diff, "max_decoded_diff": decoded_diff,
            "pass": lp_diff <= LP_TOL and code_diff <= 1}


def check_top_targets(device: torch.device, sizes: Sizes) -> dict:
    """Top-k and nucleus targets: torch on the device vs numba on CPU, both vs float64."""
    n, vocab = sizes.positions, sizes.vocab
    logits = teacher_logits(n, vocab, pad=64, seed=0)
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(1))
    ref = dense_logprobs(logits, vocab)
    out = {}
    for spec in (TargetSpec(kind="topk", k=sizes.k),
                 TargetSpec(kind="nucleus", k=None, top_p=0.95, min_k=1, max_k=2 * sizes.k)):
        dev = position_targets(logits.to(device), labels.to(device), spec, vocab, backend="torch")
        cpu = position_targets(logits, labels, spec, vocab, backend="numba")
        case = {"device_torch": path_errors(dev, ref, labels.numpy(), spec),
                "cpu_numba": path_errors(cpu, ref, labels.numpy(), spec),
                "device_vs_cpu": between_paths(dev, cpu, n, spec)}
        case["pass"] = all(v["pass"] for v in case.values())
        out[f"targets_{spec.kind}"] = case
    return out


def draws(t, n: int, samples: int) -> tuple[np.ndarray, dict]:
    """(n, samples) sorted drawn ids from a TargetArrays' ids and counts, and structural errors."""
    out = np.zeros((n, samples), np.int64)
    bad = 0
    for i, (ids, _, counts) in enumerate(csr(t, n)):
        bad += int(counts.sum()) != samples or (np.diff(ids) <= 0).any() or (counts <= 0).any()
        if int(counts.sum()) == samples:
            out[i] = np.repeat(ids, counts)
    return out, {"malformed_positions": bad}


def inverse_cdf_errors(drawn: np.ndarray, u: np.ndarray, cdf: np.ndarray) -> int:
    """Draws whose (sorted) uniform lies outside its id's float64 CDF interval by more than CDF_TOL."""
    rows = np.arange(len(drawn))[:, None]
    hi = cdf[rows, drawn]
    lo = np.where(drawn > 0, cdf[rows, np.maximum(drawn - 1, 0)], 0.0)
    us = np.sort(u, 1)                      # the inverse CDF is monotone: the k-th smallest uniform gives the
    return int(((us < lo - CDF_TOL) | (us > hi + CDF_TOL)).sum())      # k-th smallest id


def ks_pit(drawn: np.ndarray, ref: np.ndarray, cdf: np.ndarray, seed: int) -> tuple[float, float]:
    """(D, critical value) of the KS test of the randomised PIT F(v-1) + U p_v of every draw: uniform on
    [0, 1] iff the draws follow the float64 distribution."""
    rows = np.arange(len(drawn))[:, None]
    p = np.exp(ref[rows, drawn])
    lo = cdf[rows, drawn] - p
    w = np.sort((lo + np.random.default_rng(seed).random(drawn.shape) * p).ravel())
    m = len(w)
    d = max(float((np.arange(1, m + 1) / m - w).max()), float((w - np.arange(m) / m).max()))
    return d, KS_CRITICAL / math.sqrt(m)


def check_sampled_targets(device: torch.device, sizes: Sizes) -> dict:
    """Sampled targets: the same uniforms on both paths (exact inverse CDF), then each device's own seeded
    stream (a KS test against float64)."""
    n, vocab, s = sizes.positions, sizes.vocab, sizes.samples
    logits = teacher_logits(n, vocab, pad=0, seed=2)
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(3))
    ref = dense_logprobs(logits, vocab)
    cdf = np.cumsum(np.exp(ref), 1)
    cdf /= cdf[:, -1:]
    spec = TargetSpec(kind="sample", k=None, samples=s, seed=0)
    u = torch.rand((n, s), generator=torch.Generator().manual_seed(4))
    drawn, same_uniforms = {}, {}
    for name, dev in (("device_torch", device), ("cpu_torch", torch.device("cpu"))):
        t = position_targets(logits.to(dev), labels.to(dev), spec, vocab, u.to(dev), backend="torch")
        drawn[name], info = draws(t, n, s)
        info["inverse_cdf_errors"] = inverse_cdf_errors(drawn[name], u.numpy().astype(np.float64), cdf)
        info["max_logprob_err"] = max(float(np.abs(lp - ref[i, ids]).max()) for i, (ids, lp, _) in enumerate(csr(t, n)))
        info["pass"] = info["malformed_positions"] == 0 and info["inverse_cdf_errors"] == 0 and \
            info["max_logprob_err"] <= LP_TOL
        same_uniforms[name] = info
    same_uniforms["draws_equal"] = float((drawn["device_torch"] == drawn["cpu_torch"]).mean())
    same_uniforms["pass"] = same_uniforms["device_torch"]["pass"] and same_uniforms["cpu_torch"]["pass"]

    seeded, supports = {}, {}
    length = 64                                  # positions as (row, column) of rows 64 long
    rows, cols = torch.arange(n) // length, torch.arange(n) % length
    row_indices = list(range(int(rows.max()) + 1))
    for name, dev in (("device_torch", device), ("cpu_torch", torch.device("cpu"))):
        uu = position_uniforms(spec, row_indices, rows, cols, length, dev)
        t = position_targets(logits.to(dev), labels.to(dev), spec, vocab, uu, backend="torch")
        d, info = draws(t, n, s)
        info["ks_d"], info["ks_critical"] = ks_pit(d, ref, cdf, seed=5)
        info["pass"] = info["malformed_positions"] == 0 and info["ks_d"] <= info["ks_critical"]
        seeded[name] = info
        supports[name] = [set(row.tolist()) for row in d]
    seeded["support_overlap"] = float(np.mean([len(a & b) / len(a | b) for a, b in
                                               zip(supports["device_torch"], supports["cpu_torch"])]))
    seeded["pass"] = seeded["device_torch"]["pass"] and seeded["cpu_torch"]["pass"]
    return {"targets_sample_same_uniforms": same_uniforms, "targets_sample_seeded": seeded}


# --------------------------------------------------------------------------------------------------------
# (a) correctness: sparse KD losses and the fused head


def kd_case(n: int, vocab: int, k: int, seed: int):
    """A student's logits (n, V) and a teacher's top-k targets (rest bucket) and k draws (counts), with the
    hard rows: k = 1 (row 0), rest 0 (row 1), a confident student (rows 2-5: the teacher's top 4 ids raised
    by 40), a stored id 100 nats down (row 6); weight 0 at row 7, an ignored label at row 8."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.log_softmax(torch.randn(n, vocab, generator=g).double() * 6, -1)
    top = teacher.topk(k, dim=-1)
    sizes = torch.full((n,), k)
    sizes[0] = 1
    ids, lps, rest, cnt_ids, counts = [], [], [], [], []
    for i in range(n):
        lp = top.values[i, :sizes[i]]
        if i == 1:
            lp = lp - lp.logsumexp(0)            # all the mass stored: rest 0
        ids.append(top.indices[i, :sizes[i]])
        lps.append(lp.float())
        rest.append(max(0.0, 1.0 - float(lp.exp().sum())))
        u, c = torch.multinomial(teacher[i].exp(), k, replacement=True, generator=g).unique(return_counts=True)
        cnt_ids.append(u)
        counts.append(c.float())
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    topk = SparseTargets(offsets, torch.cat(ids), torch.cat(lps), torch.tensor(rest, dtype=torch.float32))
    sampled_offsets = torch.tensor([0] + np.cumsum([len(u) for u in cnt_ids]).tolist())
    sampled = SparseTargets(sampled_offsets, torch.cat(cnt_ids), torch.cat([teacher[i, u].float() for i, u in
                                                                            enumerate(cnt_ids)]),
                            None, torch.cat(counts))
    z = torch.randn(n, vocab, generator=g) * 2
    for i in range(2, 6):
        z[i, top.indices[i, :4]] += 40.0
    z[6, top.indices[6, k - 1]] -= 100.0
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[8] = IGNORE_INDEX
    weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
    weights[7] = 0.0
    return z, topk, sampled, labels, weights


def padded(targets: SparseTargets, n: int):
    """(valid (n, K), ids (n, K), logprobs (n, K) float64 with -inf padding, counts (n, K))."""
    sizes = targets.offsets[1:] - targets.offsets[:-1]
    pos = torch.repeat_interleave(torch.arange(n), sizes)
    slot = torch.arange(len(targets.ids)) - targets.offsets[:-1][pos]
    width = int(sizes.max())
    valid = torch.zeros(n, width, dtype=torch.bool)
    valid[pos, slot] = True
    ids = torch.zeros(n, width, dtype=torch.long)
    ids[pos, slot] = targets.ids.long()
    lp = torch.full((n, width), -math.inf, dtype=torch.float64)
    lp[pos, slot] = targets.logprobs.double()
    counts = torch.zeros(n, width, dtype=torch.float64)
    if targets.counts is not None:
        counts[pos, slot] = targets.counts.double()
    return valid, ids, lp, counts


def dense_total(z: torch.Tensor, targets: SparseTargets, labels, weights, cfg: KDConfig) -> torch.Tensor:
    """sum_i w_i (ce_w CE_i + kd_w T² KD_i) written out densely over the full vocabulary in float64 (z float64,
    autograd): the student's buckets (stored ids, the rest) from its full log-softmax, the teacher's
    (stored log-probs, the rest mass or none) tempered and normalised among themselves."""
    n, _ = z.shape
    t = cfg.temperature
    valid, ids, lp, counts = padded(targets, n)
    logq = torch.log_softmax(z / t, -1)
    lq = torch.where(valid, logq.gather(1, ids), -math.inf)
    if cfg.loss == "sampled_ce":
        w = counts / counts.sum(1, keepdim=True)
        kd = -(w * torch.where(valid, lq, 0.0)).sum(1)
    else:
        inside = torch.zeros_like(z, dtype=torch.bool)
        inside[torch.arange(n)[:, None].expand_as(ids)[valid], ids[valid]] = True
        lq = torch.cat([lq, torch.where(inside, -math.inf, logq).logsumexp(1, keepdim=True)], 1)
        rest = targets.rest.double().log() if cfg.tail == "rest" else torch.full((n,), -math.inf, dtype=torch.float64)
        lpt = torch.log_softmax(torch.cat([lp, rest[:, None]], 1) / t, 1)
        p, q = lpt.exp(), lq.exp()
        if cfg.loss == "forward_kl":
            kd = torch.where(p > 0, p * (torch.where(p > 0, lpt, 0.0) - lq), 0.0).sum(1)
        elif cfg.loss == "reverse_kl":
            kd = torch.where(q > 0, q * (lq - lpt.clamp_min(math.log(PROB_FLOOR))), 0.0).sum(1)
        else:
            raise ValueError(cfg.loss)
    has = labels >= 0
    ce = torch.where(has, -torch.log_softmax(z, -1).gather(1, labels.clamp_min(0)[:, None])[:, 0], 0.0)
    return (weights * (cfg.ce_weight * ce + cfg.kd_weight * t * t * kd)).sum()


def gradient_error(got: torch.Tensor, want: torch.Tensor, weights, cfg: KDConfig) -> tuple[float, int]:
    """test_loss_edges' criterion: (largest relative error at entries >= 1e-6 of their row's largest,
    >= 1e-9 s_i and >= 1e-30; entries whose absolute error exceeds 1e-9 s_i + GRAD_REL |want|), where
    s_i = |w_i| (T kd_weight + ce_weight) is row i's scale."""
    got, want = got.double(), want.double()
    s = (weights.double().abs() * (cfg.temperature * cfg.kd_weight + cfg.ce_weight))[:, None]
    diff = (got - want).abs()
    bad_abs = int((diff > 1e-9 * s + GRAD_REL * want.abs()).sum())
    scale = want.abs().amax(1, keepdim=True)
    checked = (want.abs() >= 1e-6 * scale) & (want.abs() >= 1e-9 * s) & (want.abs() >= 1e-30)
    rel = torch.where(checked, diff / want.abs().clamp_min(1e-300), 0.0)
    return float(rel.max()), bad_abs


def loss_and_grad(fn, z: torch.Tensor):
    x = z.clone().requires_grad_(True)
    total = fn(x)
    total.backward()
    return float(total.detach()), x.grad.detach().cpu()


def check_losses(device: torch.device, sizes: Sizes) -> dict:
    """sparse_kd_loss: the torch backend on the device vs the numba kernel on CPU, both vs dense float64."""
    n, vocab = max(sizes.positions, 16), sizes.vocab
    z, topk, sampled, labels, weights = kd_case(n, vocab, sizes.k, seed=10)
    cases = [("forward_kl/rest", KDConfig(loss="forward_kl", ce_weight=0.5), topk),
             ("forward_kl/renormalize T=2", KDConfig(loss="forward_kl", tail="renormalize", temperature=2.0), topk),
             ("reverse_kl/rest", KDConfig(loss="reverse_kl"), topk),
             ("sampled_ce", KDConfig(loss="sampled_ce", ce_weight=0.5), sampled)]
    out = {}
    for name, cfg, targets in cases:
        want_total, want_grad = loss_and_grad(
            lambda x, targets=targets, cfg=cfg: dense_total(x, targets, labels, weights, cfg), z.double())
        row = {}
        runs = {"device_torch": (device, "torch"), "cpu_numba": (torch.device("cpu"), "numba")}
        grads = {}
        for label, (dev, backend) in runs.items():
            tg, lab, w = targets.to(dev), labels.to(dev), weights.to(dev)
            total, grad = loss_and_grad(
                lambda x, tg=tg, lab=lab, w=w, cfg=cfg, backend=backend: sparse_kd_loss(x, tg, lab, w, cfg,
                                                                                        backend=backend)[0],
                z.to(dev))
            rel, bad_abs = gradient_error(grad, want_grad, weights, cfg)
            loss_rel = abs(total - float(want_total)) / abs(float(want_total))
            row[label] = {"loss_rel_err": loss_rel, "grad_rel_err": rel, "grad_abs_violations": bad_abs,
                          "pass": loss_rel <= LOSS_RTOL and rel <= GRAD_REL and bad_abs == 0}
            grads[label] = (total, grad)
        scale = float(want_grad.abs().max())
        row["device_vs_cpu"] = {"loss_diff": abs(grads["device_torch"][0] - grads["cpu_numba"][0]),
                                "grad_max_diff_over_max": float((grads["device_torch"][1] - grads["cpu_numba"][1])
                                                                .abs().max()) / scale}
        row["pass"] = row["device_torch"]["pass"] and row["cpu_numba"]["pass"]
        out[name] = row
    out["pass"] = all(v["pass"] for v in out.values())
    return {"losses": out}


def check_fused_head(device: torch.device, sizes: Sizes) -> dict:
    """fused_linear_sparse_kd vs logits = hidden @ weight.T + sparse_kd_loss, on the device, and both vs float64:
    loss (rtol LOSS_RTOL) and the gradients of hidden and weight (max |error| <= GRAD_REL x the largest entry)."""
    n, vocab, hidden = max(sizes.positions, 16), sizes.vocab, sizes.student_hidden
    _, topk, _, labels, weights = kd_case(n, vocab, sizes.k, seed=11)
    g = torch.Generator().manual_seed(12)
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * (3 / math.sqrt(hidden))
    cfg = KDConfig(loss="forward_kl", ce_weight=0.5)

    def run(fn, h0, w0):
        hh, ww = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        total = fn(hh, ww)
        total.backward()
        return float(total.detach()), hh.grad.detach().cpu().double(), ww.grad.detach().cpu().double()

    tg, lab, wt = topk.to(device), labels.to(device), weights.to(device)
    chunk = n // 3 + 1                                         # uneven chunks, the last one shorter
    fused = run(lambda a, b: fused_linear_sparse_kd(a, b, tg, lab, wt, cfg, chunk_size=chunk)[0],
                h.to(device), w.to(device))
    unfused = run(lambda a, b: sparse_kd_loss(a @ b.T, tg, lab, wt, cfg)[0], h.to(device), w.to(device))
    exact = run(lambda a, b: dense_total(a @ b.T, topk, labels, weights, cfg), h.double(), w.double())

    def compare(got, want):
        return {"loss_rel_err": abs(got[0] - want[0]) / abs(want[0]),
                "grad_hidden_err": float((got[1] - want[1]).abs().max() / want[1].abs().max()),
                "grad_weight_err": float((got[2] - want[2]).abs().max() / want[2].abs().max())}

    out = {"fused_vs_unfused": compare(fused, unfused), "fused_vs_float64": compare(fused, exact),
           "unfused_vs_float64": compare(unfused, exact), "chunk_size": chunk}
    out["pass"] = all(v["loss_rel_err"] <= LOSS_RTOL and v["grad_hidden_err"] <= GRAD_REL
                      and v["grad_weight_err"] <= GRAD_REL for k, v in out.items() if k != "chunk_size")
    return {"fused_head": out}


# --------------------------------------------------------------------------------------------------------
# (b) build overhead


def word_tokenizer(vocab: int):
    """A real word-level fast tokenizer of exactly ``vocab`` tokens: <eos> = 0, <unk> = 1, "w2" ... "w{V-1}"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")
    assert len(fast) == vocab, len(fast)
    return fast


def llama(vocab: int, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, max_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_len,
                       tie_word_embeddings=True)


def make_teacher(folder: Path, sizes: Sizes, device: torch.device, dtype: torch.dtype):
    """A random-initialised Llama on ``device`` in ``dtype``, saved with its tokenizer in ``folder``."""
    from transformers import LlamaForCausalLM

    tokenizer = word_tokenizer(sizes.vocab)
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"   # the generic class name loads in transformers 4.x and 5.x
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=1))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(llama(sizes.vocab, sizes.teacher_hidden, sizes.teacher_layers,
                                       sizes.teacher_intermediate, sizes.teacher_heads, sizes.teacher_kv_heads,
                                       sizes.seq_len))
    model = model.to(dtype).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model, tokenizer


def write_corpus(path: Path, sizes: Sizes) -> None:
    """build_rows documents of seq_len - 1 random words: with the EOS packing adds, one document per row."""
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(sizes.build_rows):
            words = rng.integers(2, sizes.vocab, sizes.seq_len - 1)
            f.write(json.dumps({"text": " ".join(f"w{i}" for i in words)}) + "\n")


@torch.no_grad()
def bare_forward(model, tokenizer, data, sizes: Sizes, device: torch.device) -> tuple[float, int]:
    """Seconds and tokens of what a user would run: the rows read and tokenized as the build does, then
    model(input_ids).logits consumed (.float().sum()) batch by batch."""
    from teachercache.teacher.corpus import DocumentCounts, iter_packed_rows

    sync(device)
    t0 = time.perf_counter()
    rows = list(iter_packed_rows(data, tokenizer, DocumentCounts()))
    tokens = 0
    for a in range(0, len(rows), sizes.build_batch):
        batch = rows[a:a + sizes.build_batch]
        ids = torch.from_numpy(np.stack([r.input_ids.astype(np.int64) for r in batch])).to(device)
        model(input_ids=ids, use_cache=False).logits.float().sum().item()
        tokens += ids.numel()
    sync(device)
    return time.perf_counter() - t0, tokens


def timed_build(teacher: Path, data, out: Path, sizes: Sizes, device: torch.device, dtype: torch.dtype):
    """build_cache end to end; (seconds without loading the teacher, tokens, bytes)."""
    from teachercache.teacher.build import BuildOptions, build_cache

    dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    sync(device)
    r = build_cache(BuildOptions(teacher=str(teacher), data=data, out=str(out), batch_size=sizes.build_batch,
                                 targets=TargetSpec(kind="topk", k=sizes.k), dtype=dtype_name, device=device.type,
                                 progress=False))
    sync(device)
    return r.seconds - r.load_seconds, r.tokens, r.bytes


def check_build(work: Path, sizes: Sizes, device: torch.device, report: Report) -> dict:
    """(b): the bare forward against the whole build, alternating, the fastest of each; the last cache stays in
    work/cache-* for (c)."""
    from teachercache.teacher.corpus import DataOptions

    dtype = resolve_dtype("auto", device)
    teacher = work / "teacher"
    teacher.mkdir()
    t0 = time.perf_counter()
    model, tokenizer = make_teacher(teacher, sizes, device, dtype)
    made_s = time.perf_counter() - t0
    corpus = work / "corpus.jsonl"
    write_corpus(corpus, sizes)
    data = DataOptions(paths=(str(corpus),), seq_len=sizes.seq_len)
    warm = DataOptions(paths=(str(corpus),), seq_len=sizes.seq_len, max_docs=sizes.build_batch)
    bare_forward(model, tokenizer, warm, sizes, device)       # warm-up: kernels, allocator
    forward, build, cache = [], [], None
    for i in range(sizes.repeats):
        started = time.perf_counter()
        forward.append(bare_forward(model, tokenizer, data, sizes, device))
        free(device)
        cache = work / f"cache-{i}"
        build.append(timed_build(teacher, data, cache, sizes, device, dtype))
        free(device)
        if i + 1 < sizes.repeats and report.left() < 3 * (time.perf_counter() - started) + 120:
            report.data["notes"].append(f"build: {i + 1} of {sizes.repeats} repeats (time budget)")
            break
    params = sum(p.numel() for p in model.parameters())
    del model
    free(device)
    f_s, tokens = min(forward)
    b_s, b_tokens, b_bytes = min(build)
    ratio = b_s / f_s
    return {"teacher_params": params, "dtype": str(dtype).replace("torch.", ""), "make_teacher_s": round(made_s, 2),
            "rows": sizes.build_rows, "seq_len": sizes.seq_len, "batch": sizes.build_batch, "tokens": tokens,
            "repeats": len(forward), "forward_s": round(f_s, 4), "build_s": round(b_s, 4),
            "forward_tokens_per_s": round(tokens / f_s), "build_tokens_per_s": round(b_tokens / b_s),
            "bytes_per_token": round(b_bytes / b_tokens, 2), "build_over_forward": round(ratio, 4),
            "all_forward_s": [round(s, 4) for s, _ in forward], "all_build_s": [round(s, 4) for s, _, _ in build],
            "target": TARGETS["build_over_forward"], "target_met": ratio <= TARGETS["build_over_forward"],
            "cache": str(cache)}


# --------------------------------------------------------------------------------------------------------
# (c) training step


def timed_step(run, device: torch.device) -> tuple[float, int | None]:
    """Seconds of one synchronised optimizer step of student.train, and on CUDA the peak memory it allocated
    beyond what was allocated before it (activations, logits, loss and gradients; not weights or states)."""
    from teachercache.student.train import optimizer_step

    sync(device)
    base = None
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    optimizer_step(run)
    sync(device)
    seconds = time.perf_counter() - t0
    return seconds, None if base is None else torch.cuda.max_memory_allocated(device) - base


def time_modes(cache: Path, student: Path, work: Path, sizes: Sizes, device: torch.device, modes: dict) -> dict:
    """Every mode's run set up side by side (same student weights, seed and rows), warm-up steps, then the
    timed steps interleaved (ce, kd, kd_fused, ce, ...) so that a slow minute hurts every mode alike; per
    mode the fastest and the median step and the largest extra peak memory (CUDA)."""
    from teachercache.student.options import LoaderOptions, ScheduleOptions, TrainOptions
    from teachercache.student.train import set_up

    runs = {name: set_up(TrainOptions(cache=str(cache), student=str(student), out=str(work / f"run-{name}"),
                                      device=device.type, schedule=ScheduleOptions(steps=10**6,
                                                                                   batch_size=sizes.student_batch),
                                      loader=LoaderOptions(shuffle=False), progress=False, **kw))
            for name, kw in modes.items()}
    try:
        params = sum(p.numel() for p in next(iter(runs.values())).model.parameters())
        for run in runs.values():
            for _ in range(sizes.warmup_steps):
                timed_step(run, device)
        steps = {name: [] for name in runs}
        for _ in range(sizes.timed_steps):
            for name, run in runs.items():
                steps[name].append(timed_step(run, device))
    finally:
        for run in runs.values():
            if run.lock is not None:
                run.lock.close()
    del runs
    free(device)
    out = {"student_params": params}
    for name, rows in steps.items():
        seconds = [s for s, _ in rows]
        extra = None if device.type != "cuda" else max(m for _, m in rows)
        out[name] = {"step_s": round(min(seconds), 5), "median_step_s": round(float(np.median(seconds)), 5),
                     "extra_peak_mb": None if extra is None else round(extra / 2**20, 1)}
    return out


def check_train(cache: Path, work: Path, sizes: Sizes, device: torch.device) -> dict:
    """(c): CE-only vs cached top-k KD vs the same with the fused head, on the same student and rows."""
    from teachercache.student.options import KDOptions

    student = work / "student.json"
    llama(sizes.vocab, sizes.student_hidden, sizes.student_layers, sizes.student_intermediate, sizes.student_heads,
          sizes.student_kv_heads, sizes.seq_len).to_json_file(student)
    modes = {"ce": {"kd": KDOptions(ce_weight=1.0, kd_weight=0.0)}, "kd": {}, "kd_fused": {"fused_head": True}}
    rows = time_modes(cache, student, work, sizes, device, modes)
    ratio = rows["kd"]["step_s"] / rows["ce"]["step_s"]
    fused, unfused = rows["kd_fused"]["extra_peak_mb"], rows["kd"]["extra_peak_mb"]
    return {**rows, "rows_per_step": sizes.student_batch, "seq_len": sizes.seq_len, "timed_steps": sizes.timed_steps,
            "kd_over_ce": round(ratio, 4), "fused_over_ce": round(rows["kd_fused"]["step_s"] / rows["ce"]["step_s"], 4),
            "target": TARGETS["kd_over_ce"], "target_met": ratio <= TARGETS["kd_over_ce"],
            "fused_over_unfused_peak": None if fused is None else round(fused / unfused, 4),
            "memory": "extra peak of a step: torch.cuda.max_memory_allocated minus the memory allocated before it"
            if device.type == "cuda" else "not measured on CPU (null)"}


# --------------------------------------------------------------------------------------------------------


def summary(data: dict) -> dict:
    """Pass/fail per correctness check and whether each performance target was met (None: not run)."""
    out = {name: c["pass"] for name, c in data.get("correctness", {}).items() if isinstance(c, dict)}
    for part in ("build", "train"):
        out[f"{part}_target_met"] = data.get(part, {}).get("target_met")
    return out


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto: CUDA when torch sees it.")
    ap.add_argument("--small", action="store_true", help="Tiny sizes (the CPU smoke run of the test suite).")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="Time budget: parts that would not fit are skipped; the watchdog stops the run 60 s after it.")
    ap.add_argument("--skip", nargs="*", default=[], choices=("correctness", "build", "train"),
                    help="Parts not to run.")
    docs = field_docs(Sizes)
    for f in fields(Sizes):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=None,
                        help=f"{docs.get(f.name, '')} [default {f.default}; --small {getattr(SMALL, f.name)}]")
    args = ap.parse_args()
    given = {f.name: getattr(args, f.name) for f in fields(Sizes) if getattr(args, f.name) is not None}
    return args, replace(SMALL if args.small else Sizes(), **given)


def main() -> int:
    args, sizes = parse_args()
    report = Report(args.budget_s)
    report.watchdog()
    device = resolve_device(args.device)
    report.data.update({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device_type": device.type, "torch": torch.__version__, "transformers": transformers.__version__,
        "numba": numba.__version__, "small": args.small,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "sizes": asdict(sizes)})
    if device.type == "cpu":
        report.data["notes"].append("CPU run: the 'device' path is torch on CPU; timings are no GPU figures")
    correct = None
    if "correctness" not in args.skip:
        report.part = "correctness"
        t0 = time.perf_counter()
        checks = {}
        for check in (check_top_targets, check_sampled_targets, check_losses, check_fused_head):
            name = check.__name__.removeprefix("check_")
            found = attempt(lambda check=check: check(device, sizes), report, name)
            checks.update(found if "error" not in found else {name: found})
            free(device)
        correct = all(c["pass"] for c in checks.values())
        report.data["correctness"] = {**checks, "pass": correct, "seconds": round(time.perf_counter() - t0, 2)}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work, cache = Path(tmp), None
        if "build" not in args.skip and fits(report, "build", 120):
            report.data["build"] = attempt(lambda: check_build(work, sizes, device, report), report, "build")
            cache = report.data["build"].pop("cache", None)
        if "train" not in args.skip:
            if cache is None:
                report.data["train"] = {"skipped": "no cache: the build part did not run"}
            elif fits(report, "train", 60):
                report.data["train"] = attempt(lambda: check_train(Path(cache), work, sizes, device), report, "train")
    report.data["all_correct"] = correct
    report.data["summary"] = summary(report.data)
    report.part = "done"
    report.emit()
    return 0 if correct in (True, None) else 1


def fits(report: Report, part: str, seconds: float) -> bool:
    """Whether ``seconds`` of the budget are left for ``part``; if not, the part is noted as skipped."""
    if report.left() >= seconds:
        report.part = part
        return True
    report.data[part] = {"skipped": f"{max(report.left(), 0):.0f} s of the budget left, {seconds:g} s needed"}
    return False


def attempt(fn, report: Report, name: str) -> dict:
    """fn()'s result, or {"error": the exception, "pass": False} with its traceback on stderr: one broken part
    must not cost the figures of the others (a lent GPU's minutes are few)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 -- reported in the JSON, and the run goes on
        traceback.print_exc()
        report.data["notes"].append(f"{name}: {type(e).__name__}")
        return {"error": f"{type(e).__name__}: {e}"[:500], "pass": False}


if __name__ == "__main__":
    sys.exit(main())
