"""transformers.Trainer trains from a cache through student.hf's collator and Trainer subclass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, TrainingArguments

from student.data import CacheDataset
from student.hf import CacheCollator, DistillationTrainer
from student.train import load_student
from teachercache.build import BuildOptions, build_cache
from teachercache.data import DataOptions
from teachercache.kernels import KDConfig, SparseTargets, sparse_kd_loss
from teachercache.manifest import TargetSpec

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
    # the loss Trainer computes is the kernel's loss over the batch's target positions
    batch = collator([row for _, row in zip(range(4), CacheDataset(cache, shuffle=False))])
    want_model_loss = trainer.compute_loss(model, batch)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    pos = batch["target_positions"]
    z = out.reshape(-1, out.shape[-1])[pos]
    targets = SparseTargets(batch["target_offsets"], batch["target_ids"], batch["target_logprobs"],
                            batch["rest_mass"])
    want, _, _ = sparse_kd_loss(z, targets, batch["labels"].reshape(-1)[pos], None, cfg, backend="torch")
    assert want_model_loss.item() == pytest.approx(want.item(), rel=1e-5)
    before = [p.detach().clone() for p in model.parameters()]
    result = trainer.train()
    assert result.global_step == 4
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(x > 0 for x in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
