"""Hint loss: layer maps checked against student, teacher and cache; losses against hand computations."""

from __future__ import annotations

import pytest
import torch

from teachercache.student.hint import HintConfigError, HintProjector, hint_loss, parse_layer_map, resolve_layer_map


def test_parse_layer_map():
    assert parse_layer_map("2:6, 4:12") == [(2, 6), (4, 12)]
    assert parse_layer_map("3") == [(3, 3)]
    with pytest.raises(HintConfigError, match="STUDENT:TEACHER"):
        parse_layer_map("2-6")
    with pytest.raises(HintConfigError, match="twice"):
        parse_layer_map("2:6,2:8")


def test_resolve_layer_map_refuses_wrong_indices():
    ok = resolve_layer_map([(2, 6)], student_layers=4, cache_layers=(3, 6), teacher_layers=8)
    assert ok == [(2, 6)]
    with pytest.raises(HintConfigError, match="student has layers 0..4"):
        resolve_layer_map([(5, 6)], student_layers=4, cache_layers=(6,))
    with pytest.raises(HintConfigError, match="teacher has layers 0..8"):
        resolve_layer_map([(2, 9)], student_layers=4, cache_layers=(9,), teacher_layers=8)
    with pytest.raises(HintConfigError, match="stores teacher layers 3, 6, not 4"):
        resolve_layer_map([(2, 4)], student_layers=4, cache_layers=(3, 6))
    with pytest.raises(HintConfigError, match="stores no hidden states"):
        resolve_layer_map([(2, 4)], student_layers=4, cache_layers=())


def test_hint_losses_match_hand_computation_and_train_phi():
    torch.manual_seed(0)
    student = {2: torch.randn(5, 3)}
    teacher = {6: torch.randn(5, 4)}
    proj = HintProjector([(2, 6)], 3, 4)
    w = proj.maps["2_6"].weight
    assert w.shape == (4, 3) and proj.maps["2_6"].bias is None
    mapped = student[2] @ w.T
    want_mse = sum(((mapped[i, j] - teacher[6][i, j]) ** 2).item() for i in range(5) for j in range(4)) / 20
    assert hint_loss(student, teacher, proj, "mse").item() == pytest.approx(want_mse, rel=1e-6)
    cos = [(mapped[i] @ teacher[6][i] / (mapped[i].norm() * teacher[6][i].norm())).item() for i in range(5)]
    assert hint_loss(student, teacher, proj, "cosine").item() == pytest.approx(sum(1 - c for c in cos) / 5, rel=1e-6)
    # same widths: identity, no parameters
    same = HintProjector([(1, 1)], 4, 4)
    assert not list(same.parameters())
    assert hint_loss({1: teacher[6]}, {1: teacher[6]}, same).item() == 0
    # φ learns: a few steps reduce the loss
    opt = torch.optim.SGD(proj.parameters(), lr=0.1)
    first = hint_loss(student, teacher, proj).item()
    for _ in range(50):
        opt.zero_grad()
        loss = hint_loss(student, teacher, proj)
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first
