"""student: train small models from a teachercache cache, with the teacher nowhere in memory.

``dataset`` (rows of a cache per rank and worker, shuffled, resumable) -> ``collate`` (a StudentBatch)
-> ``losses`` / ``fused_head`` (sparse KD kernels over ``kd_types``) and ``hint`` -> ``train`` (the
loop, with ``options``, ``model`` and ``checkpoints``) -> a Hugging Face model directory. ``evaluate`` measures any
causal LM; ``hf`` plugs the same pieces into transformers.Trainer; ``demo`` is the README's main job.
"""

from teachercache import compat as _compat

_compat.install()
