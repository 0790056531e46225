"""transformers.Trainer trains from a cache through student.hf's collator and Trainer subclass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, TrainingArguments

from teachercache.student.collate import StudentBatch
from teachercache.student.dataset import CacheDataset
from teachercache.student.hf import BATCH_KEY, CacheCollator, DistillationTrainer, hf_labels
from teachercache.student.losses import KDConfig, SparseTargets, sparse_kd_loss
from teachercache.student.model import load_student
from teachercache.format.manifest import TargetSpec
from teachercache.teacher.build import BuildOptions, build_cache
from teachercache.teacher.corpus import DataOptions

ROOT = Path(__file__).resolve().parents[2]


def test_trainer_subclass_trains_with_the_sparse_kd_loss(tmp_path):
    cache = tmp_path / "cache"
    build_cache(BuildOptions(teacher=str(ROOT / "data" / "teacher"), out=str(cache), progress=False,
                             data=DataOptions(paths=(str(ROOT / "data" / "corpus" / "valid.parquet"),), seq_len=32,
                                              max_docs=1), targets=TargetSpec(kind="topk", k=8)))
    tok = AutoTokenizer.from_pretrained(cache / "tokenizer")
    torch.manual_seed(0)
    model = load_student("llama-tiny", len(tok))
    collator = CacheCollator(tok)
    cfg = KDConfig(ce_weight=0.25)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=3e-3, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                             dataloader_num_workers=0)
    trainer = DistillationTrainer(model=model, args=args, train_dataset=CacheDataset(cache, shuffle=False),
                                  data_collator=collator, kd_config=cfg)
    # Trainer gets a Mapping: the token tensors for its own accounting, and the typed batch
    inputs = collator([row for _, row in zip(range(4), CacheDataset(cache, shuffle=False))])
    batch = inputs[BATCH_KEY]
    assert isinstance(batch, StudentBatch) and set(inputs) == {"input_ids", "attention_mask", "labels", BATCH_KEY}
    assert inputs["input_ids"] is batch.input_ids and inputs["attention_mask"] is batch.attention_mask
    assert collator.pad_id == (tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    # the loss Trainer computes is the kernel's loss over the batch's target positions
    want_model_loss = trainer.compute_loss(model, inputs)
    assert trainer.compute_loss(model, batch).item() == want_model_loss.item()
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    pos = batch.target_positions
    z = out.reshape(-1, out.shape[-1])[pos]
    targets = SparseTargets(batch.target_offsets, batch.target_ids, batch.target_logprobs, batch.rest_mass)
    want, _, _ = sparse_kd_loss(z, targets, batch.labels.reshape(-1)[pos], None, cfg, backend="torch")
    assert pos.numel() > 0 and want_model_loss.item() == pytest.approx(want.item(), rel=1e-5)
    before = [p.detach().clone() for p in model.parameters()]
    result = trainer.train()
    assert result.global_step == 4
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(x > 0 for x in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _build_uneven(tmp_path):
    """A cache of 8 rows of different lengths: one document each (document packing)."""
    corpus = tmp_path / "uneven.jsonl"
    words = "the river ran past the old mill and on towards the sea where boats waited".split()
    corpus.write_text("".join(json.dumps({"text": " ".join(words[: 3 + 2 * i])}) + "\n" for i in range(8)))
    cache = tmp_path / "cache-uneven"
    build_cache(BuildOptions(teacher=str(ROOT / "data" / "teacher"), out=str(cache), progress=False,
                             data=DataOptions(paths=(str(corpus),), seq_len=64, packing="document"),
                             targets=TargetSpec(kind="topk", k=8)))
    return cache


def test_collator_labels_follow_hugging_face_convention(tmp_path):
    cache = _build_uneven(tmp_path)
    tok = AutoTokenizer.from_pretrained(cache / "tokenizer")
    batch = CacheCollator(tok)([row for _, row in zip(range(4), CacheDataset(cache, shuffle=False))])[BATCH_KEY]
    labels = hf_labels(batch)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            predicted_here = t > 0 and bool(batch.loss_mask[b, t - 1])
            assert labels[b, t].item() == (batch.input_ids[b, t].item() if predicted_here else -100)
    # Trainer's count of labels[..., 1:] that are not -100 is the number of target positions
    assert labels[:, 1:].ne(-100).sum().item() == batch.num_positions


def _train_hf(cache, out, batch_size, accum, steps=2):
    tok = AutoTokenizer.from_pretrained(cache / "tokenizer")
    torch.manual_seed(0)
    model = load_student("llama-tiny", len(tok))
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accum, learning_rate=3e-3, report_to=[], use_cpu=True,
                             logging_steps=1, save_strategy="no", dataloader_num_workers=0, lr_scheduler_type="constant",
                             warmup_steps=0, max_grad_norm=1e9)
    trainer = DistillationTrainer(model=model, args=args, train_dataset=CacheDataset(cache, shuffle=False),
                                  data_collator=CacheCollator(tok), kd_config=KDConfig(ce_weight=0.25))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return ([h["loss"] for h in logs], [h["grad_norm"] for h in logs],
            torch.cat([p.detach().reshape(-1) for p in model.parameters()]))


def test_trainer_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Batch x accumulation 4x1, 2x2 and 1x4 consume the same 4 rows per optimizer step and must give the same
    loss, gradient norm and weights: the step's loss is the mean over all its target positions. Rows of
    different lengths (document packing) make the mean of micro-batch means differ from it."""
    cache = _build_uneven(tmp_path)
    rows = [row for _, row in zip(range(8), CacheDataset(cache, shuffle=False))]
    counts = [int(r["target_mask"].sum()) for r in rows]
    assert len(rows) == 8 and len(set(counts)) > 1, counts
    runs = {shape: _train_hf(cache, tmp_path / f"out{shape}", *shape) for shape in ((4, 1), (2, 2), (1, 4))}
    loss, gnorm, weights = runs[(4, 1)]
    assert len(loss) == 2 and loss[0] > 0.5
    for shape in ((2, 2), (1, 4)):
        other_loss, other_gnorm, other_weights = runs[shape]
        assert other_loss == pytest.approx(loss, rel=1e-4), shape
        assert other_gnorm == pytest.approx(gnorm, rel=1e-3), shape
        # Adam turns float rounding in near-zero gradients into differences up to ~1e-5 (lr 3e-3)
        torch.testing.assert_close(other_weights, weights, rtol=0, atol=1e-4)
