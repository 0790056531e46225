"""Collation: rows of a cache -> one typed ``StudentBatch``; token-only rows of a text file -> a ``TokenBatch``.

The batch is the one object that crosses from the data pipeline (student.dataset) to the training loop
(student.train), evaluation (student.evaluate) and transformers.Trainer (student.hf). Its fields carry
their shapes: B rows, T tokens (the longest row), P target positions, E stored target entries.
Labels are already shifted (``labels[b, t]`` is token t + 1), so they are compared with the logits at
the same t and never handed to a Hugging Face model's ``labels=`` (it would shift them again).
``StudentBatch.sparse_targets()`` is the batch's teacher targets as the loss kernels take them.

A ``TokenBatch`` (text-file evaluation) has the token fields only: no teacher targets exist for it.
Both are frozen and compare by identity (``==`` on tensors has no single truth value).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Sequence

import numpy as np
import torch

from teachercache.student.kd_types import IGNORE_INDEX, SparseTargets
from teachercache.errors import CacheFormatError


@dataclass(frozen=True, eq=False)
class TokenBatch:
    """Tokens, masks and next-token labels of B rows (no teacher targets): text-file evaluation."""

    input_ids: torch.Tensor         # [B, T] long, right-padded with the pad id
    attention_mask: torch.Tensor    # [B, T] long, 1 on tokens, 0 on padding
    loss_mask: torch.Tensor         # [B, T] bool, True where the next token is predicted
    labels: torch.Tensor            # [B, T] long, input_ids[b, t + 1] where loss_mask, else IGNORE_INDEX
    target_positions: torch.Tensor  # [P] long, flat index b * T + t of every loss_mask position, ascending

    @property
    def num_positions(self) -> int:
        """P: the positions with a label."""
        return self.target_positions.numel()

    def to(self, device, non_blocking: bool = False) -> "TokenBatch":
        """The batch with every tensor on ``device``."""
        return _map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))


@dataclass(frozen=True, eq=False)
class StudentBatch:
    """B rows of a cache: the tokens, masks and shifted labels, and the teacher's sparse targets at the P
    target positions (in the order of ``target_positions``), CSR style over E entries."""

    input_ids: torch.Tensor               # [B, T] long, right-padded with the pad id
    attention_mask: torch.Tensor          # [B, T] long, 1 on tokens, 0 on padding
    loss_mask: torch.Tensor               # [B, T] bool, the rows' target_mask, False on padding
    labels: torch.Tensor                  # [B, T] long, input_ids[b, t + 1] where loss_mask, else IGNORE_INDEX
    target_positions: torch.Tensor        # [P] long, flat index b * T + t of every target, ascending
    target_offsets: torch.Tensor          # [P+1] long, entries of position p: [offsets[p], offsets[p+1])
    target_ids: torch.Tensor              # [E] long, stored token ids
    target_logprobs: torch.Tensor         # [E] float32, teacher log-probs over its full vocabulary
    target_counts: torch.Tensor | None    # [E] float32 draws (sampled caches), else None
    rest_mass: torch.Tensor               # [P] float32, teacher mass outside the stored ids
    label_logprob: torch.Tensor           # [P] float32, teacher log-prob of the actual next token
    hidden: dict[int, torch.Tensor]       # {teacher layer: [P, H] float32}, empty unless layers were read
    row_index: torch.Tensor               # [B] long, each row's global index in file order

    @property
    def num_positions(self) -> int:
        """P: the target positions of the batch."""
        return self.target_positions.numel()

    def sparse_targets(self, device=None) -> SparseTargets:
        """The targets as student.losses takes them (offsets, ids, logprobs, rest, counts), on ``device``
        when one is given."""
        targets = SparseTargets(self.target_offsets, self.target_ids, self.target_logprobs, self.rest_mass,
                                self.target_counts)
        return targets if device is None else targets.to(device)

    def to(self, device, non_blocking: bool = False) -> "StudentBatch":
        """The batch with every tensor (hidden states included) on ``device``."""
        return _map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "StudentBatch":
        """Every tensor in pinned memory (what a DataLoader with ``pin_memory=True`` calls)."""
        return _map_tensors(self, lambda t: t.pin_memory())


def _map_tensors(batch, fn: Callable[[torch.Tensor], torch.Tensor]):
    """A copy of a batch dataclass with ``fn`` applied to every tensor field and every tensor of a dict
    field; None stays None."""
    changes = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = fn(value)
        elif isinstance(value, dict):
            changes[f.name] = {k: fn(v) for k, v in value.items()}
    return replace(batch, **changes)


def check_row(row: dict, where: str) -> None:
    """A row's per-position arrays must match its target mask, and no target may sit on its last token
    (that position would predict a token outside the row). CacheFormatError naming ``where`` otherwise."""
    mask = row["target_mask"]
    n_pos = int(mask.sum())
    if len(row["target_offsets"]) != n_pos + 1 or len(row["rest_mass"]) != n_pos:
        raise CacheFormatError(where, f"row {row['row_index']}: {len(row['target_offsets']) - 1} target positions "
                               f"stored but target_mask marks {n_pos}", "the cache is inconsistent; rebuild it")
    if len(mask) and mask[-1]:
        raise CacheFormatError(where, f"row {row['row_index']}: target_mask marks the row's last token, whose "
                               "next token is not in the row", "rebuild the cache with this teachercache")


def pad_and_shift(ids: Sequence, masks: Sequence, pad_id: int):
    """Rows of token ids (T_b,) and target masks (T_b,) -> (input_ids, attention_mask, loss_mask, labels),
    each [B, T]: right-padded with ``pad_id``; labels the next token where the mask is set, else
    IGNORE_INDEX. No mask may mark its row's last token (whose next token is not in the row)."""
    B, T = len(ids), max(len(x) for x in ids)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.bool)
    for b, (row_ids, row_mask) in enumerate(zip(ids, masks)):
        n = len(row_ids)
        input_ids[b, :n] = torch.as_tensor(np.asarray(row_ids))
        attention_mask[b, :n] = 1
        loss_mask[b, :n] = torch.as_tensor(np.asarray(row_mask, bool))
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    labels[:, :-1] = torch.where(loss_mask[:, :-1], input_ids[:, 1:], IGNORE_INDEX)  # (B, T) next tokens
    return input_ids, attention_mask, loss_mask, labels


def collate_rows(rows: Sequence[dict], pad_id: int = 0) -> StudentBatch:
    """Rows of a CacheDataset (dicts of numpy arrays, see CacheDataset) -> a StudentBatch. Targets are
    concatenated row by row in token order, the order of ``target_positions``."""
    if not rows:
        raise ValueError("collate_rows: no rows")
    for row in rows:
        check_row(row, f"collate_rows (row_index {row['row_index']})")
    input_ids, attention_mask, loss_mask, labels = pad_and_shift([r["input_ids"] for r in rows],
                                                                 [r["target_mask"] for r in rows], pad_id)

    def cat(key, dtype):
        return torch.from_numpy(np.concatenate([np.asarray(r[key]) for r in rows]).astype(dtype))

    entries = np.cumsum([0] + [len(r["target_ids"]) for r in rows])       # first entry of each row
    offsets = [rows[0]["target_offsets"][:1]] + [r["target_offsets"][1:] + e for r, e in zip(rows, entries)]
    has_counts = {"target_counts" in r for r in rows}
    if len(has_counts) > 1:
        raise ValueError("collate_rows: some rows have target_counts and some do not")
    layers = {tuple(sorted(r.get("hidden", {}))) for r in rows}
    if len(layers) > 1:
        raise ValueError(f"collate_rows: rows carry different hidden layers {sorted(layers)}")
    return StudentBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        labels=labels,
        target_positions=torch.nonzero(loss_mask.reshape(-1)).reshape(-1),
        target_offsets=torch.from_numpy(np.concatenate(offsets).astype(np.int64)),
        target_ids=cat("target_ids", np.int64),
        target_logprobs=cat("target_logprobs", np.float32),
        target_counts=cat("target_counts", np.float32) if has_counts == {True} else None,
        rest_mass=cat("rest_mass", np.float32),
        label_logprob=cat("label_logprob", np.float32),
        hidden={layer: torch.from_numpy(np.concatenate([r["hidden"][layer] for r in rows]).astype(np.float32))
                for layer in layers.pop()},
        row_index=torch.tensor([int(r["row_index"]) for r in rows], dtype=torch.long),
    )


def collate_tokens(rows: Sequence[tuple], pad_id: int = 0) -> TokenBatch:
    """(input_ids (T_b,), target_mask (T_b,)) pairs, e.g. packed rows of a text file -> a TokenBatch."""
    if not rows:
        raise ValueError("collate_tokens: no rows")
    masks = [np.asarray(mask, bool).copy() for _, mask in rows]
    for mask in masks:
        mask[-1:] = False                         # a row's last token predicts nothing in the row
    input_ids, attention_mask, loss_mask, labels = pad_and_shift([ids for ids, _ in rows], masks, pad_id)
    return TokenBatch(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask, labels=labels,
                      target_positions=torch.nonzero(loss_mask.reshape(-1)).reshape(-1))
