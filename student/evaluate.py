"""Measure any causal LM the same way: perplexity, expected calibration error, and KD loss against a cache.

``evaluate_model(model, source)`` takes a cache directory (its rows and targets) or a text file (jsonl,
parquet or txt, tokenised with the model's tokenizer and packed into rows of ``seq_len``). Over every
target position (a cache's masked-in positions; every next token of a text file):

* perplexity: exp(mean next-token cross-entropy);
* ECE (top-1, 15 equal-width confidence bins): sum over bins of (share of positions) × |accuracy -
  mean confidence|, where confidence is the model's largest next-token probability and accuracy whether
  that token is the actual next one;
* for a cache: the mean KD loss of the model against the cached targets (forward KL with the rest bucket
  for top-k/nucleus caches, the sampled cross-entropy for sampled ones), and agreement: how often the
  model's top-1 token is the teacher's top stored one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from teachercache.kernels import KDConfig, SparseTargets, sparse_kd_loss

ECE_BINS = 15


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
    ece: float
    accuracy: float
    kd_loss: float | None = None
    teacher_agreement: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _eval_batches(source: str | Path, tokenizer, batch_size: int, seq_len: int, max_rows: int | None):
    """Collated batches of a cache (with targets) or a text file (labels only)."""
    from .data import CacheDataset, collate_rows

    path = Path(source)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if (path / "manifest.json").is_file():
        rows = []
        for i, row in enumerate(CacheDataset(path, shuffle=False, rank=0, world_size=1)):
            if max_rows is not None and i >= max_rows:
                break
            rows.append(row)
            if len(rows) == batch_size:
                yield collate_rows(rows, pad)
                rows = []
        if rows:
            yield collate_rows(rows, pad)
        return
    from teachercache.data import DataOptions, DocumentCounts, iter_rows

    options = DataOptions(paths=(str(path),), seq_len=seq_len)
    batch = []
    for i, row in enumerate(iter_rows(options, tokenizer, DocumentCounts())):
        if max_rows is not None and i >= max_rows:
            break
        ids = torch.tensor(row.input_ids, dtype=torch.int64)
        mask = torch.tensor(row.target_mask)
        batch.append((ids, mask))
        if len(batch) == batch_size:
            yield _text_batch(batch, pad)
            batch = []
    if batch:
        yield _text_batch(batch, pad)


def _text_batch(rows, pad: int) -> dict:
    t = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), t), pad, dtype=torch.int64)
    attention = torch.zeros((len(rows), t), dtype=torch.int64)
    labels = torch.full((len(rows), t), -100, dtype=torch.int64)
    for b, (ids, mask) in enumerate(rows):
        n = len(ids)
        input_ids[b, :n] = ids
        attention[b, :n] = 1
        nxt = torch.full((n,), -100, dtype=torch.int64)
        nxt[:-1] = ids[1:]
        labels[b, :n] = torch.where(mask, nxt, -100)
    positions = (labels.view(-1) >= 0).nonzero()[:, 0]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "target_positions": positions}


@torch.no_grad()
def evaluate_model(model, source: str | Path, tokenizer, *, batch_size: int = 8, seq_len: int = 512,
                   max_rows: int | None = None, kd_config: KDConfig | None = None,
                   device: torch.device | str = "cpu") -> EvalResult:
    """Perplexity, ECE and (for a cache) KD loss of ``model`` over ``source``; see the module docstring."""
    model.eval()
    nll_sum, kd_sum, agree, correct_sum, positions = 0.0, 0.0, 0, 0, 0
    calib = Calibration.empty()
    is_cache = (Path(source) / "manifest.json").is_file()
    for batch in _eval_batches(source, tokenizer, batch_size, seq_len, max_rows):
        pos = batch["target_positions"]
        if pos.numel() == 0:
            continue
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        vocab = logits.shape[-1]
        z = logits.reshape(-1, vocab)[pos.to(device)].float()
        labels = batch["labels"].reshape(-1)[pos].to(device)
        logq = torch.log_softmax(z, -1)
        nll_sum += float(-logq.gather(1, labels[:, None]).sum())
        conf, top = logq.max(-1)
        correct = top == labels
        correct_sum += int(correct.sum())
        calib.add(conf.exp(), correct)
        positions += pos.numel()
        if is_cache:
            targets = SparseTargets(batch["target_offsets"], batch["target_ids"], batch["target_logprobs"],
                                    batch["rest_mass"], batch.get("target_counts")).to(device)
            cfg = kd_config or KDConfig(loss="sampled_ce" if targets.counts is not None else "forward_kl")
            if cfg.loss == "sampled_ce" and targets.counts is None:   # a top-k held-out cache
                cfg = KDConfig(loss="forward_kl", tail=cfg.tail)
            weights = torch.ones(pos.numel(), dtype=torch.float64, device=device)
            _, _, kd = sparse_kd_loss(z, targets, None, weights, cfg)
            kd_sum += float(kd.sum())
            first = targets.offsets[:-1]
            has = targets.offsets[1:] > first
            teacher_top = targets.ids[first[has]]
            agree += int((top[has] == teacher_top).sum())
    if positions == 0:
        raise ValueError(f"{source}: no target positions to evaluate")
    loss = nll_sum / positions
    return EvalResult(positions=positions, loss=loss, perplexity=math.exp(min(loss, 700)), ece=calib.ece(),
                      accuracy=correct_sum / positions,
                      kd_loss=kd_sum / positions if is_cache else None,
                      teacher_agreement=agree / positions if is_cache else None)
