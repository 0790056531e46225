"""Hint loss: pull chosen student hidden states towards the teacher's cached ones (FitNets-style).

Layer indices follow Hugging Face's ``output_hidden_states``: 0 is the embedding output, L the output
of block L (1 ≤ L ≤ num_hidden_layers). The cache stores teacher layers under the same convention
(``teachercache build --hidden-layers``). The map is explicit pairs ``student_layer:teacher_layer``,
e.g. ``"2:6,4:12"``, resolved once at start-up against the student, the cache and (when known) the
teacher; a wrong index is an error, never a warning.

φ: a bias-free linear map from the student's width to the teacher's for each pair whose widths differ
(identity when they agree), trained with the student and saved beside it.

    mse     mean over positions and features of (φ(s) - t)²
    cosine  mean over positions of 1 - cos(φ(s), t)

and the hint term is the mean over the pairs.
"""

from __future__ import annotations

import torch
from torch import nn

from teachercache.errors import TeachercacheError

HINT_KINDS = ("mse", "cosine")


class HintConfigError(TeachercacheError):
    """The hint layer map does not fit the student, the teacher or the cache."""


def parse_layer_map(text: str) -> list[tuple[int, int]]:
    """``"2:6,4:12"`` -> [(2, 6), (4, 12)]; a bare ``"6"`` pairs student layer 6 with teacher layer 6."""
    pairs = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        parts = item.split(":")
        try:
            if len(parts) == 1:
                pairs.append((int(parts[0]), int(parts[0])))
            elif len(parts) == 2:
                pairs.append((int(parts[0]), int(parts[1])))
            else:
                raise ValueError
        except ValueError:
            raise HintConfigError(f"hint layer map {text!r}: {item!r} is not STUDENT:TEACHER "
                                  f"(write e.g. --hint-layers 2:6,4:12)") from None
    students = [s for s, _ in pairs]
    if len(set(students)) != len(students):
        raise HintConfigError(f"hint layer map {text!r} names a student layer twice")
    return pairs


def resolve_layer_map(pairs: list[tuple[int, int]], *, student_layers: int, cache_layers: tuple[int, ...],
                      teacher_layers: int | None = None, cache: str = "the cache") -> list[tuple[int, int]]:
    """Check every pair against the student's depth, the cache's stored layers and the teacher's depth."""
    if not pairs:
        raise HintConfigError("the hint layer map is empty (write e.g. --hint-layers 2:6)")
    if not cache_layers:
        raise HintConfigError(f"{cache} stores no hidden states: rebuild it with --hidden-layers, "
                              "or train without --hint-layers")
    for s, t in pairs:
        if not 0 <= s <= student_layers:
            raise HintConfigError(f"hint pair {s}:{t}: the student has layers 0..{student_layers} "
                                  "(0 = embeddings, L = output of block L)")
        if teacher_layers is not None and not 0 <= t <= teacher_layers:
            raise HintConfigError(f"hint pair {s}:{t}: the teacher has layers 0..{teacher_layers}")
        if t not in cache_layers:
            raise HintConfigError(f"hint pair {s}:{t}: {cache} stores teacher layers "
                                  f"{', '.join(map(str, cache_layers))}, not {t}")
    return list(pairs)


class HintProjector(nn.Module):
    """φ per pair: bias-free Linear(student width -> teacher width), or identity when the widths agree."""

    def __init__(self, pairs: list[tuple[int, int]], student_width: int, teacher_width: int):
        super().__init__()
        self.pairs = list(pairs)
        self.maps = nn.ModuleDict({
            f"{s}_{t}": (nn.Linear(student_width, teacher_width, bias=False) if student_width != teacher_width
                         else nn.Identity())
            for s, t in self.pairs})

    def forward(self, s: int, t: int, states: torch.Tensor) -> torch.Tensor:
        return self.maps[f"{s}_{t}"](states)


def hint_loss(student_states: dict[int, torch.Tensor], teacher_states: dict[int, torch.Tensor],
              projector: HintProjector, kind: str = "mse") -> torch.Tensor:
    """Mean hint loss over the projector's pairs; states are [P, width] at the same P target positions."""
    if kind not in HINT_KINDS:
        raise HintConfigError(f"unknown hint loss {kind!r}: choose {' or '.join(HINT_KINDS)}")
    losses = []
    for s, t in projector.pairs:
        student = projector(s, t, student_states[s].float())
        teacher = teacher_states[t].to(student.dtype)
        if student.shape != teacher.shape:
            raise HintConfigError(f"hint pair {s}:{t}: student states {tuple(student.shape)} after φ, "
                                  f"teacher states {tuple(teacher.shape)}")
        if kind == "mse":
            losses.append(((student - teacher) ** 2).mean())
        else:
            losses.append((1 - torch.nn.functional.cosine_similarity(student, teacher, dim=-1, eps=1e-8)).mean())
    return torch.stack(losses).mean()
