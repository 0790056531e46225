"""The student model: load it, check that it fits the cache, and (for the baseline) a live teacher.

``load_student`` takes a preset (small Llama-style students sized for the cache's vocabulary), a config
.json (fresh weights) or a pretrained directory / hub id; ``student_tokenizer`` its tokenizer (the
student's own, else the copy in the cache). ``check_student`` and ``check_fusable`` refuse, before any
step runs, a student that does not fit: another tokenizer, too few output columns, hint layers it does
not have, a head the chunked loss cannot reproduce. ``load_online_teacher`` and ``online_kd_loss`` are
the baseline the cache is measured against: forward KL to a live teacher's full distribution.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from teachercache.student.hint import resolve_layer_map
from teachercache.student.kd_types import KDConfig
from teachercache.errors import TeachercacheError
from teachercache.format.cache import Cache
from teachercache.format.manifest import TOKENIZER_DIR, tokenizer_fingerprint
from teachercache.teacher.head import LOGIT_TRANSFORMS, logit_transforms

PRESETS = {
    # small Llama-style students; vocab_size comes from the cache
    "llama-tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2),
    "llama-small": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2),
    "llama-base": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8,
                       num_key_value_heads=4),
}


class TrainError(TeachercacheError):
    """A training run cannot start: the student, the cache or the options do not fit together."""


def student_tokenizer(student: str, cache: Cache, trust_remote_code: bool = False):
    """The student's own tokenizer when its directory has one (loaded with ``trust_remote_code``), else the
    copy stored in the cache, which never runs code (``Cache.tokenizer``); TrainError when it cannot load."""
    from transformers import AutoTokenizer

    path = Path(student)
    own = path.is_dir() and any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    if not own:
        if not (cache.path / TOKENIZER_DIR).is_dir():
            raise TrainError(f"{cache.path}: the cache has no {TOKENIZER_DIR}/ and {student} brings no tokenizer")
        return cache.tokenizer()
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises ValueError (custom code refused), OSError, KeyError, ...
        hint = "" if trust_remote_code else "; if it names custom code you trust, add --trust-remote-code"
        raise TrainError(f"--student {student}: cannot load its tokenizer ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]}){hint}") from None


def load_student(spec: str, vocab_size: int, trust_remote_code: bool = False):
    """A pretrained path/hub id, a config json (fresh weights), or a preset name (fresh weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if spec in PRESETS:
        config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=4096, tie_word_embeddings=True,
                             **PRESETS[spec])
        return AutoModelForCausalLM.from_config(config)
    path = Path(spec)
    if path.suffix == ".json" and path.is_file():
        try:
            values = json.loads(path.read_text())
            values.setdefault("vocab_size", vocab_size)
            config = AutoConfig.for_model(**values)
        except (ValueError, KeyError, TypeError) as e:
            raise TrainError(f"{path}: not a model config a transformers Auto class can read ({e}); it needs "
                             "a model_type such as \"llama\"") from None
        return AutoModelForCausalLM.from_config(config)
    if not path.exists() and os.environ.get("HF_HUB_OFFLINE") == "1" and "/" not in spec:
        raise TrainError(f"--student {spec}: no such file, directory or preset "
                         f"(presets: {', '.join(PRESETS)})")
    try:
        return AutoModelForCausalLM.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise TrainError(f"--student {spec}: cannot load a model from it ({e}); give a directory, a hub id, "
                         f"a config .json or a preset ({', '.join(PRESETS)})") from None


def check_student(model, tokenizer, cache: Cache, hint_pairs, cross_tokenizer: str | None = None) -> None:
    """Tokenizer fingerprint, output size and hint layers, before any step runs. With ``cross_tokenizer``
    (``--cross-tokenizer``) the student may have its own tokenizer, and its output must cover that one's ids."""
    want = cache.manifest.tokenizer.fingerprint
    got = tokenizer_fingerprint(tokenizer)
    if got != want and cross_tokenizer is None:
        raise TrainError(f"{cache.path}: the student's tokenizer (fingerprint {got[:12]}) is not the one the "
                         f"cache was built with ({want[:12]}): add --cross-tokenizer exact (or uld) to distil across "
                         "tokenizers (docs/cross_tokenizer.md), train a student that shares the teacher's tokenizer, "
                         "or rebuild the cache")
    out_size = model.get_output_embeddings().weight.shape[0]
    if cross_tokenizer is not None:
        if out_size < len(tokenizer):
            raise TrainError(f"--student: its tokenizer has {len(tokenizer)} ids, but its output only {out_size} "
                             "columns; give a student whose vocab_size covers its tokenizer")
    elif out_size < cache.layout.vocab_size:
        raise TrainError(f"{cache.path}: stored ids go up to {cache.layout.vocab_size - 1}, but the student's "
                         f"output has only {out_size} columns (a padded vocabulary may be larger, not smaller)")
    if hint_pairs:
        resolve_layer_map(hint_pairs, student_layers=model.config.num_hidden_layers,
                          cache_layers=tuple(cache.layout.hidden_layers), cache=str(cache.path))


def check_fusable(model) -> None:
    """``--fused-head`` computes logits = hidden @ head.T: refuse a student whose logits are more than that
    (a logit transform of teachercache.teacher.head, or a head bias)."""
    for attr, value in logit_transforms(model.config).items():
        raise TrainError(f"--fused-head: the student's config sets {attr}={value:g} ({LOGIT_TRANSFORMS[attr]}), "
                         "which the chunked head does not apply; train without --fused-head")
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise TrainError("--fused-head: the student's LM head has a bias; train without --fused-head")


# --------------------------------------------------------------------------------------------------------
# the online teacher: the baseline the cache is measured against


def load_online_teacher(path: str, config: KDConfig, vocab: int, device, fused_head: bool = False,
                        trust_remote_code: bool = False):
    """The live teacher of ``--online-teacher``, frozen, in eval mode, with ``tokenizer_vocab = vocab``
    (the columns of its output that a cache would store)."""
    from transformers import AutoModelForCausalLM

    if config.loss != "forward_kl" or fused_head:
        raise TrainError("--online-teacher computes forward_kl over the full vocabulary, without --fused-head")
    try:
        teacher = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code).to(device)
    except OSError as e:
        raise TrainError(f"--online-teacher {path}: cannot load it ({e})") from None
    teacher.tokenizer_vocab = vocab
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def teacher_logprobs(teacher, input_ids, attention, pos, vocab: int, temperature: float) -> torch.Tensor:
    """(P, vocab) the live teacher's log-probs at temperature T at the flat positions ``pos``."""
    logits = teacher(input_ids=input_ids, attention_mask=attention).logits
    z = logits.reshape(-1, logits.shape[-1])[pos][:, :vocab].float()
    return torch.log_softmax(z / temperature, -1)


def online_kd_loss(teacher, input_ids, attention, pos, logits, labels, weights, config: KDConfig):
    """The baseline the cache is measured against: forward KL to the live teacher's full distribution
    (over the tokenizer's ids, as a cache would store them: padding columns of the output are dropped).
    Returns (total, ce (P,), kd (P,)) like student.losses.sparse_kd_loss."""
    logp = teacher_logprobs(teacher, input_ids, attention, pos, teacher.tokenizer_vocab, config.temperature)
    t = config.temperature
    logq = torch.log_softmax(logits / t, -1)
    kd = (logp.exp() * (logp - logq[:, :logp.shape[1]])).sum(-1).double()
    ce = -torch.log_softmax(logits, -1).gather(1, labels[:, None])[:, 0].double()
    w = weights.double()
    total = (w * (config.ce_weight * ce + config.kd_weight * t * t * kd)).sum()
    return total.float(), ce.detach(), kd.detach()
