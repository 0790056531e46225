"""teachercache.student: train small models from a cache, with the teacher nowhere in memory.

(In the repository it is the top-level ``student/`` folder; it installs as ``teachercache.student``.)

``dataset`` (rows of a cache per rank and worker, shuffled, resumable) -> ``collate`` (a StudentBatch)
-> ``losses`` / ``fused_head`` (sparse KD kernels over ``kd_types``) and ``hint`` -> ``train`` (the
loop, with ``options``, ``model`` and ``checkpoints``) -> a Hugging Face model directory. ``evaluate`` measures any
causal LM; ``hf`` plugs the same pieces into transformers.Trainer; ``demo`` is the README's main job.
A student with a tokenizer of its own: ``cross_tokenizer`` (byte offsets, alignment, the id map) ->
``cross_batch`` (its collate step and loss) and ``uld`` (universal logit distillation).
"""
