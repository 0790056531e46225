"""Tiny real models of every major family, built offline: a random-initialised model from its own config class
and a small byte-level BPE tokenizer trained on the bundled corpus, saved side by side as a teacher (and student)
directory that ``AutoTokenizer`` / ``AutoModelForCausalLM`` load like a hub checkpoint.

Each ``Family`` mirrors one transformers config class at toy size (hidden 32, 2 layers, 4 heads) and keeps what
makes the family different: a head wider than the tokenizer (Qwen 2: 151,936 tokens in 152,064 rows), logit
soft-capping (Gemma 2), a logit scale (Cohere, Granite), sliding-window attention (Mistral, Gemma), experts
(Mixtral, Qwen 2 MoE), a head with a bias (Phi-2), a tokenizer without a pad token (GPT-2), one that adds BOS
(Llama, Gemma, Cohere) and chat templates of the family's own shape (ChatML, Gemma's turns, Phi-3's tags).

``HEAD_ONLY`` adds families whose forward transforms the head's logits (RecurrentGemma, Falcon-H1, xLSTM), for
checks of the head alone (``make_model``, no tokenizer). Models are seeded by family name (or ``seed``), so a
student of the same family seeded apart differs from its teacher.

>>> path = make_teacher(FAMILIES["qwen2"], tmp_path / "qwen2")   # tokenizer + model, no download
"""

from __future__ import annotations

import functools
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus" / "valid.parquet"
BPE_VOCAB = 400
"""Ids of every family's tokenizer (specials included): small, but a real merge table over 256 bytes."""


# --------------------------------------------------------------------------------------------------------
# tokenizers


@dataclass(frozen=True)
class TokenizerStyle:
    """The special tokens and behaviour of one family's tokenizer, as its tokenizer_config.json sets them."""

    name: str
    specials: tuple[str, ...]
    """Special tokens, in id order from 0 (the trainer puts them first)."""
    eos: str
    bos: str | None = None
    pad: str | None = None
    unk: str | None = None
    add_bos: bool = False
    """Prepend BOS to every encoded text (a template post-processor, like Llama's and Gemma's)."""
    chat_template: str | None = None


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA_TURNS = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
               "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
               "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
PHI3_TAGS = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

STYLES = {s.name: s for s in (
    # Llama 2 / Mistral / Mixtral (LlamaTokenizerFast): BOS added, no pad token
    TokenizerStyle("llama", ("<unk>", "<s>", "</s>"), eos="</s>", bos="<s>", unk="<unk>", add_bos=True),
    # Qwen 2 (Qwen2TokenizerFast): no BOS, <|endoftext|> pads, ChatML turns end with <|im_end|> (the EOS)
    TokenizerStyle("chatml", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), eos="<|im_end|>",
                   pad="<|endoftext|>", chat_template=CHATML),
    # Gemma (GemmaTokenizerFast): BOS added, a pad token, <start_of_turn>/<end_of_turn> turns
    TokenizerStyle("gemma", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"), eos="<eos>",
                   bos="<bos>", pad="<pad>", unk="<unk>", add_bos=True, chat_template=GEMMA_TURNS),
    # GPT-2 / CodeGen (GPT2TokenizerFast): <|endoftext|> is BOS, EOS and UNK; no pad token at all
    TokenizerStyle("gpt2", ("<|endoftext|>",), eos="<|endoftext|>", bos="<|endoftext|>", unk="<|endoftext|>"),
    # Phi-3 (LlamaTokenizerFast with Phi-3's tags): no BOS added, <|endoftext|> pads, <|end|> closes a turn
    TokenizerStyle("phi3", ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"),
                   eos="<|endoftext|>", bos="<s>", pad="<|endoftext|>", unk="<unk>", chat_template=PHI3_TAGS),
    # Cohere (CohereTokenizerFast): <BOS_TOKEN> added, <PAD>, <|END_OF_TURN_TOKEN|> as EOS
    TokenizerStyle("cohere", ("<PAD>", "<UNK>", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"), eos="<|END_OF_TURN_TOKEN|>",
                   bos="<BOS_TOKEN>", pad="<PAD>", unk="<UNK>", add_bos=True),
    # Granite 3 (GPT2TokenizerFast): <|end_of_text|> is BOS, EOS and pad; nothing added
    TokenizerStyle("granite", ("<|end_of_text|>",), eos="<|end_of_text|>", bos="<|end_of_text|>",
                   pad="<|end_of_text|>"),
    # OLMo 2 (GPT2TokenizerFast): <|endoftext|> ends documents, <|pad|> pads
    TokenizerStyle("olmo", ("<|endoftext|>", "<|pad|>"), eos="<|endoftext|>", bos="<|endoftext|>",
                   pad="<|pad|>"),
)}


@functools.lru_cache(maxsize=None)
def corpus_lines(n: int = 400) -> tuple[str, ...]:
    """The first ``n`` non-blank lines of the bundled corpus (CPython source)."""
    texts = pq.read_table(CORPUS, columns=["text"]).column("text").to_pylist()
    return tuple(line for text in texts for line in text.splitlines() if line.strip())[:n]


@functools.lru_cache(maxsize=None)
def _trained_bpe(specials: tuple[str, ...]) -> str:
    """tokenizer.json text of a byte-level BPE of BPE_VOCAB ids trained on corpus_lines()."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_lines(), trainer)
    return tok.to_str()


def make_tokenizer(style: TokenizerStyle):
    """A transformers fast tokenizer of ``style`` (not saved)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_trained_bpe(style.specials))
    if style.add_bos:
        bos = style.bos
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    roles = {f"{role}_token": getattr(style, role) for role in ("bos", "eos", "pad", "unk") if getattr(style, role)}
    extra = [t for t in style.specials if t not in roles.values()]
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=style.chat_template,
                                   additional_special_tokens=extra, **roles)


# --------------------------------------------------------------------------------------------------------
# models

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, initializer_range=0.5)
"""The toy size every Llama-like family shares. initializer_range 0.2 (not 0.02) gives logits of spread ~1, so
the next-token distributions are peaked enough that a top-k is well defined, not a near-tie over 400 ids."""


@dataclass(frozen=True)
class Family:
    """One model family at toy size: its config class, its tokenizer's style, and how its cache is built."""

    name: str
    config_class: str
    """The transformers config class it mirrors (AutoModelForCausalLM picks the model class from it)."""
    tokenizer: str
    """A STYLES key."""
    config: dict = field(default_factory=dict)
    """Config fields (SMALL unless ``own_sizes``, then these alone)."""
    own_sizes: bool = False
    """The config names its sizes itself (GPT-2's n_embd, n_layer, ...)."""
    head_multiple: int | None = None
    """Pad the head's rows up to a multiple of this (past the tokenizer's ids), as Qwen's 152,064 rows do."""
    packing: str = "document"
    chat: bool = False
    """Build its cache from conversations rendered with the tokenizer's chat template (else plain text)."""
    hidden_layers: tuple[int, ...] = ()
    fused_refusal: str | None = None
    """What makes ``--fused-head`` refuse the family as a student: a config field, or "bias"; None: fusable."""

    @property
    def style(self) -> TokenizerStyle:
        return STYLES[self.tokenizer]

    @property
    def experts(self) -> bool:
        """A mixture of experts (whose fused expert kernels, transformers' default, run in float32 and bf16 only)."""
        return "num_experts" in self.config or "num_local_experts" in self.config


FAMILIES = {f.name: f for f in (
    Family("llama", "LlamaConfig", "llama", hidden_layers=(1,)),
    Family("qwen2", "Qwen2Config", "chatml", dict(tie_word_embeddings=False), head_multiple=64, chat=True),
    # final_logit_softcapping 5 (Gemma 2 ships 30): small enough to bend these toy logits
    Family("gemma2", "Gemma2Config", "gemma", dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
                                                  final_logit_softcapping=5.0, attn_logit_softcapping=50.0),
           packing="concat", hidden_layers=(0, 2), fused_refusal="final_logit_softcapping"),
    Family("gemma3_text", "Gemma3TextConfig", "gemma", dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
                                                          layer_types=["sliding_attention", "full_attention"]),
           chat=True),
    Family("mistral", "MistralConfig", "llama", dict(sliding_window=16), packing="concat"),
    Family("phi3", "Phi3Config", "phi3", chat=True),
    Family("gpt2", "GPT2Config", "gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=128,
                                              initializer_range=0.5), own_sizes=True, packing="concat"),
    # Phi-2: partial rotary embeddings and an LM head with a bias
    Family("phi", "PhiConfig", "gpt2", dict(partial_rotary_factor=0.5), fused_refusal="bias"),
    Family("olmo2", "Olmo2Config", "olmo", packing="concat"),
    Family("mixtral", "MixtralConfig", "llama", dict(num_local_experts=4, num_experts_per_tok=2)),
    Family("qwen2_moe", "Qwen2MoeConfig", "chatml",
           dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32),
           head_multiple=64, packing="concat", hidden_layers=(2,)),
    Family("cohere", "CohereConfig", "cohere", dict(logit_scale=0.5), fused_refusal="logit_scale"),
    # Granite 3's multipliers (2B: embedding 12, residual 0.22, attention 1/64, logits 8)
    Family("granite", "GraniteConfig", "granite", dict(embedding_multiplier=12.0, residual_multiplier=0.22,
                                                      attention_multiplier=1 / 64, logits_scaling=4.0,
                                                      initializer_range=0.5),
           packing="concat", fused_refusal="logits_scaling"),
)}


HEAD_ONLY = {f.name: f for f in (
    # families whose forward transforms the head's logits, checked head and forward only (no tokenizer, no cache)
    Family("recurrent_gemma", "RecurrentGemmaConfig", "gemma",
           dict(head_dim=8, lru_width=32, attention_window_size=16, logits_soft_cap=5.0),
           fused_refusal="logits_soft_cap"),
    Family("falcon_h1", "FalconH1Config", "llama",
           dict(head_dim=8, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=16,
                lm_head_multiplier=3.0), fused_refusal="lm_head_multiplier"),
    Family("xlstm", "xLSTMConfig", "gpt2", dict(hidden_size=32, embedding_dim=32, num_hidden_layers=2, num_blocks=2,
                                                num_heads=4, output_logit_soft_cap=5.0, initializer_range=0.5),
           own_sizes=True, fused_refusal="output_logit_soft_cap"),
)}


def head_rows(family: Family, tokens: int) -> int:
    """The model's vocab_size: the tokenizer's ids, padded up to family.head_multiple (always past them) if set."""
    m = family.head_multiple
    return tokens if m is None else (tokens // m + 1) * m


def make_model(family: Family, vocab_size: int, seed: int | None = None, **fields):
    """A seeded, randomly initialised model of ``family`` with ``vocab_size`` head rows (``fields``: more config)."""
    import transformers
    from transformers import AutoModelForCausalLM

    sizes = {} if family.own_sizes else SMALL
    values = {**sizes, **family.config, **fields, "vocab_size": vocab_size}
    config = getattr(transformers, family.config_class)(**values)
    torch.manual_seed(zlib.crc32(family.name.encode()) if seed is None else seed)
    return AutoModelForCausalLM.from_config(config)


def make_teacher(family: Family, path: Path, seed: int | None = None) -> Path:
    """Save ``family``'s tokenizer and a seeded, randomly initialised model into ``path``; returns ``path``."""
    style = family.style
    tok = make_tokenizer(style)
    ids = {f"{role}_token_id": tok.convert_tokens_to_ids(getattr(style, role)) if getattr(style, role) else None
           for role in ("bos", "eos", "pad")}
    model = make_model(family, head_rows(family, len(tok)), seed, **ids)
    path.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(path)
    model.save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------------------
# documents


def write_documents(path: Path, n: int = 5, lines_per_doc: int = 4, chat: bool = False) -> Path:
    """A .jsonl of ``n`` short documents cut from the corpus: {"text"} records, or with ``chat`` one
    user/assistant exchange each ({"messages"}); returns ``path``."""
    lines = corpus_lines()[200:]                     # not the tokenizer's first training lines
    docs = ["\n".join(lines[i * lines_per_doc:(i + 1) * lines_per_doc]) for i in range(n)]
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            if chat:
                ask = f"What does this do?\n{lines[-1 - i]}"
                record = {"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": doc}]}
            else:
                record = {"text": doc}
            f.write(json.dumps(record) + "\n")
    return path
