"""transformers.Trainer trains from a cache through student.hf's collator and Trainer subclass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, TrainingArguments

from student.collate import StudentBatch
from student.dataset import CacheDataset
from student.hf import BATCH_KEY, CacheCollator, DistillationTrainer
from student.losses import KDConfig, SparseTargets, sparse_kd_loss
from student.model import load_student
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
    assert isinstance(batch, StudentBatch) and set(inputs) == {"input_ids", "attention_mask", BATCH_KEY}
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
