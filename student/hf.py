"""Train from a cache with ``transformers.Trainer``: a collator and a Trainer subclass.

    from student.data import CacheDataset
    from student.hf import CacheCollator, DistillationTrainer

    trainer = DistillationTrainer(model=student, args=TrainingArguments(..., max_steps=1000),
                                  train_dataset=CacheDataset("CACHE"), data_collator=CacheCollator(tokenizer),
                                  kd_config=KDConfig(loss="forward_kl", tail="rest", ce_weight=0.1))
    trainer.train()

The dataset streams rows (an IterableDataset), so TrainingArguments needs ``max_steps``. The loss of a
batch is ``sparse_kd_loss`` over its target positions, averaged over them (the same maths as
``teachercache train``; the global normalisation over accumulated micro-batches is ``student.train``'s
job, not Trainer's). The batch's target columns are declared as signature columns, so Trainer's
``remove_unused_columns`` keeps them.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from teachercache.kernels import KDConfig, SparseTargets, sparse_kd_loss

ROW_KEYS = ("input_ids", "target_mask", "target_offsets", "target_ids", "target_logprobs", "target_counts",
            "label_logprob", "rest_mass", "hidden", "row_index")
"""Keys of a CacheDataset row: Trainer's remove_unused_columns filters rows by these before collating."""


class CacheCollator:
    """Rows of a CacheDataset -> the batch dict of ``student.data.collate_rows`` (pad id from the tokenizer)."""

    def __init__(self, tokenizer=None, pad_id: int | None = None):
        if pad_id is None:
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.pad_id = pad_id

    def __call__(self, rows):
        from .data import collate_rows

        return collate_rows(rows, self.pad_id)


class DistillationTrainer(Trainer):
    """``transformers.Trainer`` whose loss is the sparse KD loss (+ optional CE) against cached targets."""

    def __init__(self, *args, kd_config: KDConfig = KDConfig(), **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:
            # Accelerate "dispatches" batches of an IterableDataset by slicing every tensor of the batch to
            # the batch size along dim 0, which would cut the per-position and per-entry target tensors.
            # Each process reads its own rows instead (CacheDataset partitions by rank).
            training_args.accelerator_config.dispatch_batches = False
        super().__init__(*args, **kwargs)
        self.kd_config = kd_config

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(ROW_KEYS)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        pos = inputs["target_positions"]
        vocab = outputs.logits.shape[-1]
        logits = outputs.logits.reshape(-1, vocab)[pos].float()
        labels = inputs["labels"].reshape(-1)[pos]
        targets = SparseTargets(inputs["target_offsets"], inputs["target_ids"], inputs["target_logprobs"],
                                inputs["rest_mass"], inputs.get("target_counts"))
        weights = torch.full((pos.numel(),), 1.0 / max(pos.numel(), 1), dtype=torch.float64, device=logits.device)
        loss, _, _ = sparse_kd_loss(logits, targets, labels, weights, self.kd_config)
        return (loss, outputs) if return_outputs else loss
