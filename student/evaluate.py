"""Measure any causal LM the same way: perplexity, expected calibration error, and KD loss against a cache.

``evaluate_model(model, source)`` takes a cache directory (its rows and targets) or a text file (jsonl,
parquet or txt, tokenised with the model's tokenizer and packed into rows of ``seq_len``). Over every
target position (a cache's masked-in positions; every next token of a text file):

* perplexity: exp(mean next-token cross-entropy);
* bits per byte: the summed cross-entropy in nats / (ln 2 × the UTF-8 bytes of the predicted tokens, as the
  tokenizer spells them; special tokens count 0 bytes): unlike perplexity, it compares models whose
  tokenizers cut the same text into different tokens (docs/cross_tokenizer.md);
* ECE (top-1, 15 equal-width confidence bins): sum over bins of (share of positions) × |accuracy -
  mean confidence|, where confidence is the model's largest next-token probability and accuracy whether
  that token is the actual next one;
* for a cache: the mean KD loss of the model against the cached targets (forward KL with the rest bucket
  for top-k/nucleus caches, the sampled cross-entropy for sampled ones), and agreement: how often the
  model's top-1 token is the teacher's top stored one.

Before any forward pass ``check_eval_options`` and ``check_model_fits`` refuse (``EvalError``) what would
give a traceback or a number that means nothing: a batch size, row limit or ``seq_len`` out of range, rows
longer than the model's ``max_position_embeddings``, a cache with no target positions, and on a cache a
model whose tokenizer is not the cache's (another fingerprint: the cache's ids would name other tokens for
it; the demo teacher under a permuted tokenizer of the same size scored perplexity 106,349 on a cache where
it scores 82) or whose output is narrower than the stored ids. A text file is tokenised with the tokenizer
given (the model's own, for ``teachercache eval``): there is nothing to compare it with, so a model evaluated
with a tokenizer not its own is the caller's mistake.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from teachercache.student.collate import StudentBatch
from teachercache.student.cross_tokenizer import token_byte_lengths
from teachercache.student.kd_types import KDConfig
from teachercache.student.losses import sparse_kd_loss
from teachercache.errors import TeachercacheError
from teachercache.format.cache import Cache, is_cache
from teachercache.format.manifest import tokenizer_fingerprint
from teachercache.format.storage import is_url
from teachercache.runtime import pad_id, resolve_device

ECE_BINS = 15


class EvalError(TeachercacheError):
    """A model or data source that cannot be evaluated."""


def load_model(path: str, device: str = "auto", trust_remote_code: bool = False):
    """(model on its device, its own tokenizer, device) of any causal LM: a directory or a hub id. Code that
    the repository names (an ``auto_map``) runs only with ``trust_remote_code``; without it, it is refused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code).to(dev)
    except Exception as e:  # transformers: OSError, ValueError (custom code refused); tokenizers: a plain Exception
        if "trust_remote_code" in str(e) and not trust_remote_code:   # transformers' refusal of an auto_map
            raise EvalError(f"--model {path}: its files name custom code (auto_map in config.json or "
                            "tokenizer_config.json), which runs only with --trust-remote-code: add the flag if you "
                            "trust that code") from None
        why = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        raise EvalError(f"--model {path}: cannot load a causal LM and its tokenizer ({why}); give a model "
                        "directory with its tokenizer saved beside it") from None
    return model, tokenizer, dev


def check_eval_options(batch_size: int, seq_len: int, max_rows: int | None) -> None:
    """Refuse (EvalError) a batch size or row limit below 1 and a ``seq_len`` below 2 (a row needs a token
    and the next one), whatever the caller: the CLI's ranges say the same."""
    for name, flag, value, low in (("batch_size", "--batch-size", batch_size, 1), ("seq_len", "--seq-len", seq_len, 2),
                                   ("max_rows", "--max-rows", max_rows, 1)):
        if value is None and name == "max_rows":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise EvalError(f"eval: {name} ({flag}) must be an integer of at least {low}, got {value!r}")


def _max_positions(model) -> int | None:
    """The longest row ``model`` takes (config max_position_embeddings, GPT-2's n_positions), None when unsaid."""
    cfg = model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def check_model_fits(model, tokenizer, source: str | Path, seq_len: int) -> None:
    """Refuse (EvalError), before any forward pass, data the model cannot be scored on: rows longer than its
    ``max_position_embeddings``; and for a cache, one without target positions, a tokenizer whose
    fingerprint is not the cache's, or an output narrower than the stored ids. A text file is tokenised with
    ``tokenizer`` itself, so there is no tokenizer to compare it with."""
    path, max_pos = source if is_url(source) else Path(source), _max_positions(model)
    if not is_cache(source):
        if max_pos is not None and seq_len > max_pos:
            raise EvalError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {max_pos}; "
                            f"use --seq-len {max_pos} or less")
        return
    manifest = Cache.open(path, verify_checksums=False).manifest
    if manifest.totals.target_positions == 0:
        raise EvalError(f"{path}: nothing to evaluate: the cache holds {manifest.totals.rows} rows and 0 target "
                        "positions (manifest field totals); evaluate on a cache built over some data")
    want, got = manifest.tokenizer.fingerprint, tokenizer_fingerprint(tokenizer)
    if got != want:
        raise EvalError(f"{path}: the model's tokenizer (fingerprint {got[:12]}) is not the one the cache was "
                        f"built with ({want[:12]}, manifest field tokenizer.fingerprint), so the cache's token ids "
                        "would be scored as other tokens; evaluate on this cache a model that shares the teacher's "
                        "tokenizer, or evaluate this model on a text file (--data FILE), read with its own tokenizer")
    head = model.get_output_embeddings()
    out_size = head.weight.shape[0] if head is not None else None
    if out_size is not None and out_size < manifest.layout.vocab_size:
        raise EvalError(f"{path}: stored ids go up to {manifest.layout.vocab_size - 1}, but the model's output has "
                        f"only {out_size} columns; evaluate a model that shares the teacher's tokenizer")
    if max_pos is not None and manifest.data.seq_len > max_pos:
        raise EvalError(f"{path}: rows of up to {manifest.data.seq_len} tokens (manifest field data.seq_len) exceed "
                        f"the model's max_position_embeddings {max_pos}; evaluate on a cache built with --seq-len "
                        f"{max_pos} or less")


@dataclass
class Calibration:
    """Running sums for ECE over 15 bins."""

    count: np.ndarray
    confidence: np.ndarray
    correct: np.ndarray

    @classmethod
    def empty(cls, bins: int = ECE_BINS) -> "Calibration":
        return cls(np.zeros(bins), np.zeros(bins), np.zeros(bins))

    def add(self, confidence: torch.Tensor, correct: torch.Tensor) -> None:
        bins = len(self.count)
        conf = confidence.detach().double().cpu().numpy()
        idx = np.minimum((conf * bins).astype(np.int64), bins - 1)
        np.add.at(self.count, idx, 1)
        np.add.at(self.confidence, idx, conf)
        np.add.at(self.correct, idx, correct.detach().cpu().numpy().astype(np.float64))

    def ece(self) -> float:
        total = self.count.sum()
        if total == 0:
            return float("nan")
        used = self.count > 0
        gap = np.abs(self.correct[used] - self.confidence[used])   # = n_b |acc_b - conf_b|
        return float(gap.sum() / total)


@dataclass
class EvalResult:
    positions: int
    loss: float
    perplexity: float
    bits_per_byte: float | None
    """None when the predicted tokens spell no byte (special tokens only)."""
    ece: float
    accuracy: float
    kd_loss: float | None = None
    teacher_agreement: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def eval_batches(source: str | Path, tokenizer, batch_size: int, seq_len: int, max_rows: int | None):
    """Batches of a cache (StudentBatch: with the teacher's targets) or of a text file (TokenBatch: packed
    rows of ``seq_len`` tokens, next-token labels only), in file order."""
    from teachercache.student.collate import collate_rows, collate_tokens
    from teachercache.student.dataset import CacheDataset
    from teachercache.teacher.corpus import DataOptions, DocumentCounts, iter_packed_rows

    path = source if is_url(source) else Path(source)
    pad = pad_id(tokenizer)
    if is_cache(source):
        rows, collate = CacheDataset(path, shuffle=False, rank=0, world_size=1), collate_rows
    else:
        options = DataOptions(paths=(str(path),), seq_len=seq_len)
        rows = ((row.input_ids, row.target_mask) for row in iter_packed_rows(options, tokenizer, DocumentCounts()))
        collate = collate_tokens
    batch = []
    for i, row in enumerate(rows):
        if max_rows is not None and i >= max_rows:
            break
        batch.append(row)
        if len(batch) == batch_size:
            yield collate(batch, pad)
            batch = []
    if batch:
        yield collate(batch, pad)


@torch.no_grad()
def evaluate_model(model, source: str | Path, tokenizer, *, batch_size: int = 8, seq_len: int = 512,
                   max_rows: int | None = None, kd_config: KDConfig | None = None,
                   device: torch.device | str = "cpu") -> EvalResult:
    """Perplexity, ECE and (for a cache) KD loss of ``model`` over ``source``; see the module docstring.
    ``tokenizer`` is the model's own: text is read with it, and a cache must have been built with it."""
    check_eval_options(batch_size, seq_len, max_rows)
    check_model_fits(model, tokenizer, source, seq_len)
    model.eval()
    nll_sum, kd_sum, agree, correct_sum, positions = 0.0, 0.0, 0, 0, 0
    calib = Calibration.empty()
    byte_lengths = torch.from_numpy(token_byte_lengths(tokenizer))   # (V,) bytes each id spells
    text_bytes = 0
    cached = is_cache(source)
    for batch in eval_batches(source, tokenizer, batch_size, seq_len, max_rows):
        if batch.num_positions == 0:
            continue
        batch = batch.to(device)
        pos = batch.target_positions                               # (P,) flat b * T + t
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        z = logits.reshape(-1, logits.shape[-1])[pos].float()      # (P, V)
        labels = batch.labels.reshape(-1)[pos]                     # (P,) next tokens
        logq = torch.log_softmax(z, -1)
        nll_sum += float(-logq.gather(1, labels[:, None]).sum())
        text_bytes += int(byte_lengths[labels.cpu().clamp_max(len(byte_lengths) - 1)].sum())
        conf, top = logq.max(-1)
        correct = top == labels
        correct_sum += int(correct.sum())
        calib.add(conf.exp(), correct)
        positions += batch.num_positions
        if isinstance(batch, StudentBatch):
            targets = batch.sparse_targets()
            cfg = kd_config or KDConfig(loss="sampled_ce" if targets.counts is not None else "forward_kl")
            if cfg.loss == "sampled_ce" and targets.counts is None:   # a top-k held-out cache
                cfg = KDConfig(loss="forward_kl", tail=cfg.tail)
            weights = torch.ones(batch.num_positions, dtype=torch.float64, device=device)
            _, _, kd = sparse_kd_loss(z, targets, None, weights, cfg)
            kd_sum += float(kd.sum())
            first = targets.offsets[:-1]
            has = targets.offsets[1:] > first                      # positions with a stored id
            teacher_top = targets.ids[first[has]]                  # the teacher's most likely stored id
            agree += int((top[has] == teacher_top).sum())
    if positions == 0:
        read = f"the first {max_rows} rows (--max-rows)" if max_rows is not None else "its rows"
        raise EvalError(f"{source}: nothing to evaluate: {read} hold no target positions; give data with text in "
                        "it, or more rows")
    loss = nll_sum / positions
    return EvalResult(positions=positions, loss=loss, perplexity=math.exp(min(loss, 700)),
                      bits_per_byte=nll_sum / (math.log(2) * text_bytes) if text_bytes else None, ece=calib.ece(),
                      accuracy=correct_sum / positions,
                      kd_loss=kd_sum / positions if cached else None,
                      teacher_agreement=agree / positions if cached else None)
