"""Train from a cache with ``transformers.Trainer``: a collator and a Trainer subclass.

    trainer = DistillationTrainer(model=student, args=TrainingArguments(..., max_steps=1000),
                                  train_dataset=CacheDataset("CACHE"), data_collator=CacheCollator(tokenizer),
                                  kd_config=KDConfig(loss="forward_kl", tail="rest", ce_weight=0.1))
    trainer.train()

The dataset streams rows (an IterableDataset), so TrainingArguments needs ``max_steps``. Trainer moves,
counts and measures its inputs by key, so the collator hands it a Mapping: ``input_ids``,
``attention_mask`` and ``labels`` for Trainer's own accounting, the typed StudentBatch under BATCH_KEY for
the loss (``compute_loss`` moves it to the device itself: Trainer passes a dataclass through unmoved).
ROW_KEYS are declared as signature columns, so ``remove_unused_columns`` keeps every row field.

Gradient accumulation. An optimizer step's loss is ``sparse_kd_loss`` averaged over every target position
of its micro-batches, the maths of ``teachercache train``, so batch x accumulation 4x1, 2x2 and 1x4 give
the same loss and gradients. Trainer supplies the count: ``labels`` follows Hugging Face's convention
(the token the model predicts at t - 1 sits at t, -100 where no target), so Trainer's own count of
labels that are not -100 over ``labels[..., 1:]`` (or over all of them, for models whose loss does not
shift) is the number of target positions of the whole accumulation window, ``num_items_in_batch``
(summed over processes when ``average_tokens_across_devices``). ``compute_loss`` divides the micro-batch's
summed loss by it and tells Trainer so (``model_accepts_loss_kwargs``, the flag Trainer reads to decide
whether a loss is already normalised for accumulation: the student's own ``forward`` signature does not
matter, since the loss is computed here). Without a count (evaluation, or a Mapping without labels), the
micro-batch mean is returned and Trainer divides by the accumulation steps itself. One process per device
(torchrun / accelerate): ``torch.nn.DataParallel`` over several GPUs in one process is refused.
"""

from __future__ import annotations

from typing import Mapping

import torch
from transformers import Trainer

from teachercache.student.collate import StudentBatch, collate_rows
from teachercache.student.kd_types import IGNORE_INDEX, KDConfig
from teachercache.student.losses import sparse_kd_loss
from teachercache import runtime

ROW_KEYS = ("input_ids", "target_mask", "target_offsets", "target_ids", "target_logprobs", "target_counts",
            "label_logprob", "rest_mass", "hidden", "row_index")
"""Keys of a CacheDataset row: Trainer's remove_unused_columns filters rows by these before collating."""
BATCH_KEY = "student_batch"
"""Where the StudentBatch sits in the Mapping that CacheCollator gives Trainer."""


class CacheCollator:
    """Rows of a CacheDataset -> ``{"input_ids", "attention_mask", "labels", BATCH_KEY: StudentBatch}`` for
    Trainer (``student.collate.collate_rows``; the pad id from the tokenizer unless given; ``hf_labels``)."""

    def __init__(self, tokenizer=None, pad_id: int | None = None):
        self.pad_id = runtime.pad_id(tokenizer) if pad_id is None else pad_id

    def __call__(self, rows) -> dict:
        batch = collate_rows(rows, self.pad_id)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                "labels": hf_labels(batch), BATCH_KEY: batch}


def hf_labels(batch: StudentBatch) -> torch.Tensor:
    """(B, T) labels in Hugging Face's unshifted convention: ``input_ids[b, t]`` where position t - 1 carries
    a target (the model predicts token t there), else -100. Trainer counts them for ``num_items_in_batch``."""
    labels = torch.full_like(batch.input_ids, IGNORE_INDEX)
    labels[:, 1:] = torch.where(batch.loss_mask[:, :-1], batch.input_ids[:, 1:], IGNORE_INDEX)
    return labels


def student_batch(inputs: Mapping | StudentBatch) -> StudentBatch:
    """The StudentBatch of what CacheCollator made (or a StudentBatch itself)."""
    return inputs if isinstance(inputs, StudentBatch) else inputs[BATCH_KEY]


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
        if self.args.n_gpu > 1:
            raise ValueError("DistillationTrainer: several GPUs in one process (torch.nn.DataParallel) are not "
                             "supported; launch one process per GPU with torchrun or accelerate launch")
        self.kd_config = kd_config
        # compute_loss normalises by num_items_in_batch itself, whatever the student's forward accepts: this is
        # the flag by which Trainer counts the window's labels and leaves such a loss undivided (module docstring).
        self.model_accepts_loss_kwargs = True

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(ROW_KEYS)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Trainer moves the Mapping's tensors, not the dataclass inside it: move the batch here.
        batch = student_batch(inputs).to(self.args.device)
        outputs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        pos = batch.target_positions                                      # (P,) flat b * T + t
        logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])[pos].float()   # (P, V)
        labels = batch.labels.reshape(-1)[pos]                            # (P,) next tokens
        if num_items_in_batch is None:
            denominator, scale = max(pos.numel(), 1), 1
        else:   # the target positions of every micro-batch of the step (of every process, when averaged)
            denominator = max(float(num_items_in_batch), 1.0)
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        weights = torch.full((pos.numel(),), scale / denominator, dtype=torch.float64, device=logits.device)
        loss, _, _ = sparse_kd_loss(logits, batch.sparse_targets(), labels, weights, self.kd_config)
        return (loss, outputs) if return_outputs else loss
