"""The data path and the loss of ``teachercache train --cross-tokenizer {exact,uld}``.

``CrossCollator`` is the collate step: rows of a cache (teacher tokens and targets, as CacheDataset yields
them) -> a ``CrossBatch`` in the student's own tokens (student.cross_tokenizer.Aligner), where each target
position is aligned (a teacher target predicts a token at the same byte offset) or not. Aligned positions
carry the teacher's targets: under ``exact`` in student ids, the unmapped mass in the rest bucket
(student.cross_tokenizer.map_targets), so the sparse KD kernels of student.losses run unchanged; under
``uld`` as stored (only their probabilities are used, student.uld).

``cross_batch_loss`` is the micro-batch loss: aligned positions ce_weight·CE + kd_weight·T²·KD (KD: the
sparse loss of --kd-loss and --tail, or ULD), unaligned ones unaligned_ce_weight·CE only; each position
weighted as the trainer weighs every position (1 / positions of the step). ``cross_collator`` builds the
collate step at start-up, with the id map (built once, kept as JSON beside the student) and the alignment
share of the first rows. Same-tokenizer training never comes here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from teachercache.student.collate import check_row, pad_and_shift
from teachercache.student.cross_tokenizer import (MAP_FILE, Aligner, StudentEncoder, TokenBytes, alignment_share,
                                                  load_or_build_map, map_targets, save_json)
from teachercache.student.kd_types import KDConfig, SparseTargets
from teachercache.student.losses import sparse_kd_loss
from teachercache.student.model import TrainError
from teachercache.student.uld import uld_loss

SHARE_ROWS = 64
"""Rows of the cache (file order) whose alignment share ``cross_collator`` records in MAP_FILE."""


@dataclass(frozen=True, eq=False)
class CrossBatch:
    """B rows in the student's tokens (S: the longest), P target positions, A of them aligned, E entries."""

    input_ids: torch.Tensor               # [B, S] long, the student's tokens, right-padded with its pad id
    attention_mask: torch.Tensor          # [B, S] long, 1 on tokens, 0 on padding
    loss_mask: torch.Tensor               # [B, S] bool, RowAlignment.target_mask
    labels: torch.Tensor                  # [B, S] long, input_ids[b, s + 1] where loss_mask, else IGNORE_INDEX
    target_positions: torch.Tensor        # [P] long, flat b * S + s of every target, ascending
    aligned: torch.Tensor                 # [P] bool, the position has teacher targets (the next A fields)
    target_offsets: torch.Tensor          # [A+1] long, entries of aligned position a
    target_ids: torch.Tensor              # [E] long, student ids (exact) or the teacher's own (uld)
    target_logprobs: torch.Tensor         # [E] float32, teacher log-probs
    target_counts: torch.Tensor | None    # [E] float32 draws (sampled caches), else None
    rest_mass: torch.Tensor               # [A] float32, the teacher's mass outside target_ids
    row_index: torch.Tensor               # [B] long, each row's global index in file order

    @property
    def num_positions(self) -> int:
        """P: the target positions of the batch (aligned or not)."""
        return self.target_positions.numel()

    def sparse_targets(self, device=None) -> SparseTargets:
        """The aligned positions' targets as student.losses takes them."""
        targets = SparseTargets(self.target_offsets, self.target_ids, self.target_logprobs, self.rest_mass,
                                self.target_counts)
        return targets if device is None else targets.to(device)

    def to(self, device, non_blocking: bool = False) -> "CrossBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                                for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)})


class CrossCollator:
    """Rows of a CacheDataset -> a CrossBatch (module docstring). ``mode``: exact or uld."""

    def __init__(self, aligner: Aligner, mode: str, pad_id: int):
        self.aligner, self.mode, self.pad_id = aligner, mode, pad_id

    def __call__(self, rows: Sequence[dict]) -> CrossBatch:
        if not rows:
            raise ValueError("CrossCollator: no rows")
        parts = []
        for row in rows:
            check_row(row, f"CrossCollator (row_index {row['row_index']})")
            parts.append((self.aligner.align(row["input_ids"], row["target_mask"]), row))
        input_ids, attention_mask, loss_mask, labels = pad_and_shift([a.ids for a, _ in parts],
                                                                     [a.target_mask for a, _ in parts], self.pad_id)
        aligned, offsets, ids, logprobs, rest, counts = [], [np.zeros(1, np.int64)], [], [], [], []
        entries = 0
        for a, row in parts:
            index = a.teacher_index[a.target_mask]                  # (P_b,) teacher target or -1, in position order
            aligned.append(index >= 0)
            o, i, lp, r, c = self._targets(row, index[index >= 0])
            offsets.append(o[1:] + entries)
            entries += int(o[-1])
            ids.append(i)
            logprobs.append(lp)
            rest.append(r)
            counts.append(c)
        sampled = counts[0] is not None
        return CrossBatch(
            input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask, labels=labels,
            target_positions=torch.nonzero(loss_mask.reshape(-1)).reshape(-1),
            aligned=torch.from_numpy(np.concatenate(aligned)),
            target_offsets=torch.from_numpy(np.concatenate(offsets)),
            target_ids=torch.from_numpy(np.concatenate(ids).astype(np.int64)),
            target_logprobs=torch.from_numpy(np.concatenate(logprobs).astype(np.float32)),
            target_counts=torch.from_numpy(np.concatenate(counts).astype(np.float32)) if sampled else None,
            rest_mass=torch.from_numpy(np.concatenate(rest).astype(np.float32)),
            row_index=torch.tensor([int(r["row_index"]) for _, r in parts], dtype=torch.long))

    def _targets(self, row: dict, index: np.ndarray):
        """The row's stored targets at its teacher targets ``index`` (A_b,), in that order, CSR: (offsets
        (A_b+1,), ids, logprobs, rest, counts or None); mapped into student ids under ``exact``."""
        local = np.asarray(row["target_offsets"], np.int64)
        starts, sizes = local[index], local[index + 1] - local[index]
        offsets = np.zeros(len(index) + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        entries = np.repeat(starts - offsets[:-1], sizes) + np.arange(offsets[-1])
        ids, logprobs = np.asarray(row["target_ids"])[entries], np.asarray(row["target_logprobs"])[entries]
        counts = np.asarray(row["target_counts"])[entries] if "target_counts" in row else None
        rest = np.asarray(row["rest_mass"])[index]
        if self.mode == "exact":
            return map_targets(offsets, ids, logprobs, rest, counts, self.aligner.token_map.student_ids)
        return offsets, ids, logprobs, rest, counts


# --------------------------------------------------------------------------------------------------------
# start-up


def check_cross_options(options) -> None:
    """Refuse, before anything loads, what --cross-tokenizer does not combine with (TrainError naming the
    flags): a hint loss, the fused head, an online teacher, a cache as --eval-data, and ``uld`` without CE."""
    mode = options.cross_tokenizer
    clashes = [(options.hint.layers, "--hint-layers (the cached hidden states belong to the teacher's positions)"),
               (options.fused_head, "--fused-head"),
               (options.online_teacher, "--online-teacher (it reads the cache's token ids)")]
    for given, flag in clashes:
        if given:
            raise TrainError(f"--cross-tokenizer {mode} does not combine with {flag}; leave one of them out")
    if options.eval.data and (Path(options.eval.data) / "manifest.json").is_file():
        raise TrainError(f"--eval-data {options.eval.data}: a cache holds the teacher's token ids; with "
                         "--cross-tokenizer evaluate on a text file (.jsonl/.parquet/.txt), read with the student's "
                         "own tokenizer (bits per byte compare students with different tokenizers)")
    if mode == "uld" and options.kd.ce_weight == 0 and options.kd.kd_weight > 0:
        raise TrainError("--cross-tokenizer uld compares sorted probabilities only, which says nothing about which "
                         "token is likely: give it the cross-entropy too, --ce-alpha > 0 (Boizard et al. use 1)")
    if options.kd.loss == "sampled_ce" and mode == "uld":
        raise TrainError("--kd-loss sampled_ce does not apply to --cross-tokenizer uld, which has its own loss; "
                         "leave --kd-loss out")


def cross_collator(options, cache, teacher_tokenizer, student_tokenizer, out: Path, pad_id: int,
                   write: bool) -> CrossCollator:
    """The collate step of a --cross-tokenizer run. The id map is read from ``out``/MAP_FILE when it was built
    for these two tokenizers, else built (and, when ``write``, saved there with the alignment share of the
    cache's first SHARE_ROWS rows)."""
    from teachercache.student.dataset import CacheDataset

    path = out / MAP_FILE
    token_map = load_or_build_map(path, teacher_tokenizer, student_tokenizer, write=False)
    aligner = Aligner(TokenBytes.of(teacher_tokenizer), TokenBytes.of(student_tokenizer), token_map,
                      StudentEncoder(student_tokenizer))
    if write:
        rows = CacheDataset(cache.path, shuffle=False, rank=0, world_size=1, verify_checksums=False)
        sample = (row for _, row in zip(range(SHARE_ROWS), rows))
        save_json(path, {**token_map.to_json(), "mode": options.cross_tokenizer,
                         "alignment": alignment_share(sample, aligner)})
    return CrossCollator(aligner, options.cross_tokenizer, pad_id)


# --------------------------------------------------------------------------------------------------------
# the loss


def cross_batch_loss(model, batch: CrossBatch, weights: torch.Tensor, config: KDConfig, mode: str,
                     unaligned_ce_weight: float, device) -> tuple[torch.Tensor, dict]:
    """Loss of one micro-batch of a --cross-tokenizer run (weights (P,): 1 / positions of the step) and its
    parts {"ce", "kd"}, as student.train.micro_batch_loss returns them."""
    batch = batch.to(device)
    pos = batch.target_positions                                 # (P,) flat b * S + s
    labels = batch.labels.reshape(-1)[pos]                       # (P,) the student's next tokens
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with autocast:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        logits = out.logits.reshape(-1, out.logits.shape[-1])[pos].float()   # (P, V_student)
    aligned, w = batch.aligned, weights.double()
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none").double()   # (P,)
    kd = torch.zeros_like(ce)
    ce_scale = torch.where(aligned, config.ce_weight, unaligned_ce_weight).double()
    if config.kd_weight == 0 or not bool(aligned.any()):   # the CE twin, or nothing aligned here
        total = (w * ce_scale * ce).sum()
    elif mode == "uld":
        t = config.temperature
        kd_a = uld_loss(logits[aligned], batch.sparse_targets(), t)
        kd = kd.masked_scatter(aligned, kd_a.detach())
        total = (w * ce_scale * ce).sum() + (w[aligned] * config.kd_weight * t * t * kd_a).sum()
    else:   # exact: the sparse KD kernels, unchanged, on the aligned positions
        kd_total, _, kd_a = sparse_kd_loss(logits[aligned], batch.sparse_targets(), None, w[aligned],
                                           replace(config, ce_weight=0.0))
        kd = kd.masked_scatter(aligned, kd_a.double())
        total = (w * ce_scale * ce).sum() + kd_total.double()
    return total.float(), {"ce": float((w * ce.detach()).sum()), "kd": float((w * kd).sum())}
