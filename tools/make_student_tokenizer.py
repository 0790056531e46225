"""A student tokenizer of its own for cross-tokenizer distillation: trained on the bundled corpus, unlike the teacher's.

The demo teacher's tokenizer is GPT-2-style byte-level BPE (8,192 ids, the GPT-2 pre-tokenising regex).
This one is SentencePiece-style BPE of the same size: spaces become ``▁`` and words are split at them
only (no regex: punctuation, digits and indentation merge differently), characters outside the
vocabulary fall back to ``<0xNN>`` byte tokens, ``<|endoftext|>`` is id 0 (EOS, BOS and PAD). Trained on
data/corpus/train.parquet, it shares 4,430 of the teacher's 8,192 token strings (docs/cross_tokenizer.md).

    python tools/make_student_tokenizer.py --out runs/student-tokenizer
    python tools/make_student_tokenizer.py --out runs/own-student --model llama-small --seed 0   # + fresh weights

With ``--model`` the directory also holds a freshly initialised student of that preset (vocab_size: the
tokenizer's, weights from ``--seed``), so it can be given to ``teachercache train --student DIR
--cross-tokenizer exact``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "data" / "corpus" / "train.parquet"
EOS = "<|endoftext|>"


def train_tokenizer(texts, vocab_size: int = 8192):
    """SentencePiece-style BPE with byte fallback over ``texts``, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="never"),
                                     decoders.ByteFallback(), decoders.Fuse()])
    alphabet = [f"<0x{b:02X}>" for b in range(256)]   # every byte has a token: nothing is unknown
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, *alphabet],
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   model_max_length=4096, clean_up_tokenization_spaces=False)


def make_student(out: Path, vocab_size: int = 8192, model: str | None = None, seed: int = 0) -> Path:
    """Train the tokenizer on the bundled train split and save it to ``out`` (with a fresh ``model`` preset)."""
    import pyarrow.parquet as pq

    tokenizer = train_tokenizer(pq.read_table(TRAIN, columns=["text"]).column("text").to_pylist(), vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    if model:
        import torch

        from teachercache.student.model import load_student

        torch.manual_seed(seed)
        load_student(model, len(tokenizer)).save_pretrained(out, safe_serialization=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--model", default=None, help="Also save a fresh student of this preset (llama-small, ...).")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the fresh student's weights.")
    args = ap.parse_args()
    print(make_student(Path(args.out), args.vocab_size, args.model, args.seed))


if __name__ == "__main__":
    main()
