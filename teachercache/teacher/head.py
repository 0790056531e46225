"""The LM head of a Hugging Face causal LM, apart from its body: what turns final hidden states into logits.

Most families compute ``logits = final_hidden @ head.weight.T`` (+ a bias for a few). Some then transform
the logits, each named by one config field (values from the families' modeling files in transformers 5):

* ``final_logit_softcapping`` (Gemma 2, Gemma 3, Gemma 3n, Gemma 4, VaultGemma, NanoChat):
  ``cap * tanh(logits / cap)``; None or 0 = off;
* ``logits_soft_cap`` (RecurrentGemma), ``output_logit_soft_cap`` (xLSTM): the same soft-capping;
* ``logit_scale`` (Cohere, Cohere 2): ``logits * logit_scale``;
* ``lm_head_multiplier`` (Falcon-H1): ``logits * lm_head_multiplier``;
* ``logits_scaling`` (Granite, Granite MoE and its hybrids): ``logits / logits_scaling``.

Read in the modeling files of transformers 5.25 (what each ``*ForCausalLM.forward`` does to ``logits`` after
``self.lm_head(``): the families above, and no transform in Llama, Mistral, Mixtral, Qwen 2, Qwen 2 MoE,
Phi, Phi-3, GPT-2, OLMo 2 (all built and checked end to end, with Gemma 2, Gemma 3, Cohere and Granite, in
tests/teachercache/teacher/test_families.py). Not covered by this table, so left to ``SplitHead.check``
(teacher) and refused or not by field name only (student): HyperCLOVA X, whose forward *multiplies* by its
``logits_scaling`` (the table's division is Granite's), and the multimodal Muse Spark / Muse Glimmer
(``output_multiplier`` before a soft-cap), Chameleon (image-token logits masked) and Inkling
(``unpadded_vocab_size`` columns kept), none of them an AutoModelForCausalLM.

``logit_transforms(config)`` names the ones a config sets to something other than the identity, and
``apply_logit_transforms`` applies them. A student's fused head (``student.fused_head``) computes the
plain product only and refuses a model with any of them.

The teacher pass (``teachercache.teacher.build``) never asks the model for its (batch x length x
vocabulary) logits. ``split_head(model)`` gives a ``SplitHead``: the body (``model.base_model``, whose
``last_hidden_state`` is the final, normed hidden state), the head module and the transforms. The pass runs
the body, keeps the final hidden states of the target positions only, and turns them into logits a chunk
of positions at a time (``SplitHead.logits``), so the extra memory is O(chunk x V). Hidden states of
asked layers are taken by forward pre-hooks on those decoder layers only (``hidden_states[i]`` of a
Hugging Face model is the input of decoder layer i, embeddings included; ``hidden_states[L]`` is the
final normed state), gathered at the target positions as they pass. ``SplitHead.check`` compares the
split against the model's own forward on a short prefix of one row, once per build: a family that does
more after its head than LOGIT_TRANSFORMS knows (or a body that is not what it seems) is caught there,
and the build falls back to the model's whole forward with a one-line notice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOGIT_TRANSFORMS = {
    "final_logit_softcapping": "soft-capping cap * tanh(logits / cap)",
    "logits_soft_cap": "soft-capping cap * tanh(logits / cap)",
    "output_logit_soft_cap": "soft-capping cap * tanh(logits / cap)",
    "logit_scale": "logits * logit_scale",
    "lm_head_multiplier": "logits * lm_head_multiplier",
    "logits_scaling": "logits / logits_scaling",
}
"""Config field -> what the family's forward does with the head's output."""
SOFT_CAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
"""The soft-capping fields: None or 0 is off (for the others, None or 1)."""


def text_config(config):
    """The language model's part of a config (multimodal configs nest it)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def logit_transforms(config) -> dict[str, float]:
    """{field: value} of the LOGIT_TRANSFORMS a model's config sets to other than the identity."""
    cfg = text_config(config)
    found = {}
    for name in LOGIT_TRANSFORMS:
        value = getattr(cfg, name, None)
        identity = (None, 0, 0.0) if name in SOFT_CAPS else (None, 1, 1.0)
        if value not in identity:
            found[name] = float(value)
    return found


def apply_logit_transforms(logits: torch.Tensor, transforms: dict[str, float]) -> torch.Tensor:
    """``logits`` after the transforms of ``logit_transforms`` (in the families' own order: a family has one)."""
    for name in ("logit_scale", "lm_head_multiplier"):
        if name in transforms:
            logits = logits * transforms[name]
    if "logits_scaling" in transforms:
        logits = logits / transforms["logits_scaling"]
    for name in SOFT_CAPS:
        if name in transforms:
            cap = transforms[name]
            logits = torch.tanh(logits / cap) * cap
    return logits


@dataclass
class SplitHead:
    """A causal LM as body -> final hidden states -> head (+ transforms) -> logits (module docstring)."""

    body: torch.nn.Module
    head: torch.nn.Module
    transforms: dict[str, float]
    layers: torch.nn.ModuleList | None
    """The decoder layers, for the hooks of hidden-state capture (None: not found)."""

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, rows: torch.Tensor,
               cols: torch.Tensor, layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(final hidden states (P, H) at positions (rows, cols), {layer: (P, H)} of the asked ``layers``)."""
        n_layers = len(self.layers) if self.layers is not None else None
        captured, handles = {}, []

        def capture(layer):
            def hook(module, args, kwargs):
                x = args[0] if args else kwargs["hidden_states"]
                captured[layer] = x[rows.to(x.device), cols.to(x.device)]
            return hook

        try:
            for layer in layers:
                if layer != n_layers:
                    handles.append(self.layers[layer].register_forward_pre_hook(capture(layer), with_kwargs=True))
            out = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        last = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        final = last[rows.to(last.device), cols.to(last.device)]
        if n_layers in layers:
            captured[n_layers] = final
        return final, captured

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, V_out) logits of n final hidden states, as the model's forward gives them."""
        return apply_logit_transforms(self.head(hidden), self.transforms)

    @torch.no_grad()
    def check(self, model, input_ids: torch.Tensor, positions: int = 16) -> str | None:
        """None when the split gives the model's own logits on the first ``positions`` tokens of
        ``input_ids[0]``, else why not."""
        ids = input_ids[:1, :positions]
        want = model(input_ids=ids, use_cache=False).logits[0].float()
        rows = torch.zeros(ids.shape[1], dtype=torch.long)
        got = self.logits(self.hidden(ids, None, rows, torch.arange(ids.shape[1]))[0]).float()
        if got.shape != want.shape:
            return f"the split gives logits of shape {tuple(got.shape)}, the model {tuple(want.shape)}"
        gap = (got - want.to(got.device)).abs().max().item()
        scale = 1.0 + want.abs().max().item()
        if not gap <= 1e-3 * scale:   # NaN fails too
            return f"the split's logits differ from the model's by up to {gap:.3g}"
        return None


def split_head(model) -> tuple[SplitHead | None, str]:
    """(the model's SplitHead, "") or (None, why the model cannot be split: then run its whole forward)."""
    body = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or body is model or head is None:
        return None, "no separate body and LM head (base_model / get_output_embeddings)"
    n_layers = getattr(text_config(model.config), "num_hidden_layers", None)
    layers = next((m for m in body.children() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers), None)
    return SplitHead(body=body, head=head, transforms=logit_transforms(model.config), layers=layers), ""
