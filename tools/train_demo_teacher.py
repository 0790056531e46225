#!/usr/bin/env python3
"""Build the bundled demo teacher in data/ from scratch, on CPU.

What it does, top to bottom:

1. Corpus: reads the running interpreter's own standard-library ``.py`` source
   (``sysconfig.get_paths()["stdlib"]``, PSF licence), in sorted path order,
   skipping ``test/``, ``tests/``, ``idlelib/``, ``site-packages/`` and files
   that are not valid UTF-8, until about ``--corpus-mb`` MB of text.  Files are
   split into train/valid by a hash of their relative path (about 5% valid)
   and written unmodified to ``data/corpus/{train,valid}.parquet`` (zstd;
   columns ``text`` and ``path``; the Python version is in the schema
   metadata).
2. Tokenizer: a byte-level BPE (vocab 8192) trained on the train split with
   ``tokenizers``.  ``<|endoftext|>`` is id 0 and serves as eos, bos and pad
   (GPT-2 style); the tokenizer adds no special tokens on its own, so
   ``decode(encode(text)) == text`` for any text.
3. Teacher: a small ``LlamaForCausalLM`` (hidden 256, 4 layers, 4 heads, tied
   embeddings, about 5.3M parameters) trained with AdamW, linear warmup and a
   cosine decay on packed 256-token rows (documents joined by the eos token).
   It is evaluated on the valid split (packed the same way) and saved with
   the tokenizer into ``data/teacher/``, plus ``training_summary.json``.

How long it takes: with ``--minutes 20`` (the default) about 23-25 minutes on
two CPU cores: the 20-minute budget becomes a step count from the timing of
the first steps, which tends to run a few minutes over (696 steps took 23
minutes on an idle 2-core AMD EPYC, 27 on a busy one), plus under a minute
for the corpus, the tokenizer and the evaluation.

Determinism: all seeds are fixed.  ``--steps N`` fixes the number of
optimizer steps, so a run is reproducible.  With ``--minutes`` the script times
the first few (warm-up) steps, turns the budget into a step count, and then
trains exactly that many steps; the count is printed and recorded in
``training_summary.json``, so ``--steps <that count>`` repeats the run.

Usage:
    python tools/train_demo_teacher.py --minutes 20
    python tools/train_demo_teacher.py --steps 10 --data-dir /tmp/trial  # smoke test
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 8192
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__"}
VALID_PERCENT = 5
SIZE_BUDGET_BYTES = 25 * 1024 * 1024  # the whole data/ directory


# --------------------------------------------------------------------------
# 1. Corpus
# --------------------------------------------------------------------------


def is_valid_file(rel_path: str) -> bool:
    """Deterministic ~5% file-level split, from a hash of the relative path."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < VALID_PERCENT


def load_stdlib_corpus(corpus_mb: float) -> tuple[Path, list[tuple[str, str]]]:
    """Return (stdlib dir, [(relative path, text), ...]) in sorted path order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    rel_paths = sorted(p.relative_to(stdlib).as_posix() for p in stdlib.rglob("*.py"))
    budget = corpus_mb * 1_000_000
    docs, total = [], 0
    for rel in rel_paths:
        if total >= budget:
            break
        if SKIP_DIRS & set(rel.split("/")[:-1]):
            continue
        raw = (stdlib / rel).read_bytes()
        try:
            text = raw.decode("utf-8")  # bytes -> str unchanged (no newline translation)
        except UnicodeDecodeError:
            continue
        if not text.strip():
            continue  # empty __init__.py files carry no signal
        docs.append((rel, text))
        total += len(raw)
    return stdlib, docs


def write_corpus(docs: list[tuple[str, str]], out_dir: Path) -> dict:
    """Split by file and write train/valid parquet files; return split stats."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {
        b"source": b"CPython standard library .py source (PSF License), unmodified",
        b"python_version": platform.python_version().encode(),
    }
    stats = {}
    for split in ("train", "valid"):
        rows = [(p, t) for p, t in docs if is_valid_file(p) == (split == "valid")]
        table = pa.table(
            {
                "text": pa.array([t for _, t in rows], pa.string()),
                "path": pa.array([p for p, _ in rows], pa.string()),
            }
        ).replace_schema_metadata(metadata)
        pq.write_table(table, out_dir / f"{split}.parquet", compression="zstd")
        stats[split] = {
            "files": len(rows),
            "bytes": sum(len(t.encode("utf-8")) for _, t in rows),
        }
    return stats


def read_split(parquet_path: Path) -> list[dict]:
    """[{"text": ..., "path": ...}, ...] in file order."""
    return pq.read_table(parquet_path, columns=["text", "path"]).to_pylist()


def is_codec_table(rel_path: str) -> bool:
    """encodings/cp*.py etc.: generated charmap tables, far easier than code."""
    return rel_path.startswith("encodings/")


# --------------------------------------------------------------------------
# 2. Tokenizer
# --------------------------------------------------------------------------


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE, vocab 8192, <|endoftext|> = id 0 (eos = bos = pad)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS_TOKEN],  # first special token -> id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    assert tok.token_to_id(EOS_TOKEN) == 0 and tok.get_vocab_size() == VOCAB_SIZE
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=None,
        model_max_length=512,
        clean_up_tokenization_spaces=False,  # keep decode(encode(x)) == x
    )


def pack_rows(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Tokenize, join documents with eos after each, cut into [n, seq_len] rows.

    The trailing partial row is dropped.
    """
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(tokenizer.eos_token_id)
    n_rows = len(ids) // seq_len
    return torch.tensor(ids[: n_rows * seq_len], dtype=torch.long).view(n_rows, seq_len)


# --------------------------------------------------------------------------
# 3. Teacher model and training
# --------------------------------------------------------------------------


def build_model(args, eos_id: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        use_cache=True,
    )
    return LlamaForCausalLM(config)


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, peak: float, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warmup to `peak`, then cosine decay to `floor * peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def batches(rows: torch.Tensor, batch_size: int, seed: int):
    """Endless stream of batches: each epoch is a fresh seeded shuffle of rows."""
    epoch = 0
    while True:
        gen = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(len(rows), generator=gen)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield rows[order[i : i + batch_size]]
        epoch += 1


@torch.no_grad()
def evaluate(model, rows: torch.Tensor, batch_size: int = 16, top_k: int = 64) -> dict:
    """Score every next-token prediction in `rows` (each row predicts 255 tokens).

    Returns the mean NLL (nats), the perplexity, and the shape of the
    distributions: mean top-1 probability and mean mass outside the top-k.
    """
    was_training = model.training
    model.eval()
    nll_sum = top1_sum = tail_sum = 0.0
    count = 0
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        log_probs = model(input_ids=batch).logits[:, :-1].float().log_softmax(-1)
        targets = batch[:, 1:]
        top = log_probs.exp().topk(top_k, dim=-1).values
        nll_sum -= log_probs.gather(-1, targets.unsqueeze(-1)).sum().item()
        top1_sum += top[..., 0].sum().item()
        tail_sum += (1 - top.sum(-1)).clamp_min(0).sum().item()
        count += targets.numel()
    model.train(was_training)
    nll = nll_sum / count
    return {
        "loss": nll,
        "perplexity": math.exp(nll),
        "mean_top1_prob": top1_sum / count,
        f"mean_mass_outside_top{top_k}": tail_sum / count,
        "rows": len(rows),
        "tokens_scored": count,
    }


def final_evaluation(model, tokenizer, train_rows, valid_docs, valid_rows, seq_len) -> dict:
    """Valid split overall, split into code vs codec tables, first 4 rows, train sample."""
    def rows_of(docs):
        return pack_rows(tokenizer, [d["text"] for d in docs], seq_len)

    return {
        "valid": evaluate(model, valid_rows),
        "valid_code_only": evaluate(model, rows_of([d for d in valid_docs if not is_codec_table(d["path"])])),
        "valid_codec_tables": evaluate(model, rows_of([d for d in valid_docs if is_codec_table(d["path"])])),
        # What tests/test_bundled_data.py recomputes (cheap, so the test stays fast).
        "valid_first4_rows": evaluate(model, valid_rows[:4]),
        "train_first_rows": evaluate(model, train_rows[: len(valid_rows)]),
    }


def train(model, train_rows, valid_rows, args) -> dict:
    """Train for --steps, or for as many steps as fit in --minutes."""
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    stream = batches(train_rows, args.batch_size, args.seed)
    warmup = args.warmup
    total_steps = args.steps  # None -> decided after timing the warm-up steps
    tokens_per_step = args.batch_size * args.seq_len
    calib_from, calib_to = 3, min(warmup, 15)  # skip the first (slow) steps
    step_times: list[float] = []
    recent_losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    step = 0
    while total_steps is None or step < total_steps:
        if total_steps is None and step == calib_to:
            per_step = float(np.median(step_times[calib_from:]))  # robust to hiccups
            total_steps = max(calib_to + 1, int(args.minutes * 60 / per_step))
            print(
                f"[timing] {per_step:.2f} s/step -> {total_steps} steps fit in "
                f"{args.minutes:g} min (reproduce with --steps {total_steps})",
                flush=True,
            )
        lr = lr_at(step, args.lr, warmup, total_steps or 10**9)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(stream)
        step_start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step_times.append(time.perf_counter() - step_start)
        step += 1
        recent_losses = (recent_losses + [loss.item()])[-50:]
        if step % args.log_every == 0 or step == 1:
            elapsed = time.perf_counter() - t0
            print(
                f"step {step:5d}/{total_steps or '?'}  loss {loss.item():.4f}  "
                f"lr {lr:.2e}  {step * tokens_per_step / elapsed:7.0f} tok/s  "
                f"{elapsed / 60:5.1f} min",
                flush=True,
            )
        if args.eval_every and step % args.eval_every == 0:
            v = evaluate(model, valid_rows[:32])
            print(f"[eval] step {step}  valid loss (32 rows) {v['loss']:.4f}  ppl {v['perplexity']:.2f}", flush=True)
    return {
        "steps": step,
        "tokens_seen": step * tokens_per_step,
        "epochs": step * args.batch_size / len(train_rows),
        "train_minutes": (time.perf_counter() - t0) / 60,
        "train_loss_last50": sum(recent_losses) / len(recent_losses),
    }


# --------------------------------------------------------------------------
# Saving and bookkeeping
# --------------------------------------------------------------------------


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_teacher(model, tokenizer, teacher_dir: Path, data_dir: Path) -> str:
    """Save fp32; fall back to bfloat16 if data/ would exceed the size budget."""
    if teacher_dir.exists():
        shutil.rmtree(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    # transformers 5 writes its own class name ("TokenizersBackend"); the generic
    # fast-tokenizer class name loads the same tokenizer.json in 4.x and 5.x.
    config_path = teacher_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tok_config, indent=2) + "\n")
    model.save_pretrained(teacher_dir, safe_serialization=True)
    if dir_bytes(data_dir) <= SIZE_BUDGET_BYTES:
        return "float32"
    for f in teacher_dir.glob("*.safetensors"):
        f.unlink()
    model.to(torch.bfloat16).save_pretrained(teacher_dir, safe_serialization=True)
    model.float()
    return "bfloat16"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[1] / "data")
    p.add_argument("--corpus-mb", type=float, default=4.0, help="corpus size in MB of UTF-8 text")
    p.add_argument("--minutes", type=float, default=20.0, help="training wall-clock budget")
    p.add_argument("--steps", type=int, default=None, help="train exactly this many steps (overrides --minutes)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=100, help="quick valid check (32 rows); 0 = off")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data_dir: Path = args.data_dir
    corpus_dir, teacher_dir = data_dir / "corpus", data_dir / "teacher"

    stdlib, docs = load_stdlib_corpus(args.corpus_mb)
    split_stats = write_corpus(docs, corpus_dir)
    print(f"corpus: Python {platform.python_version()} stdlib at {stdlib}: {split_stats}", flush=True)

    train_docs = read_split(corpus_dir / "train.parquet")
    valid_docs = read_split(corpus_dir / "valid.parquet")
    tokenizer = train_tokenizer([d["text"] for d in train_docs])
    train_rows = pack_rows(tokenizer, [d["text"] for d in train_docs], args.seq_len)
    valid_rows = pack_rows(tokenizer, [d["text"] for d in valid_docs], args.seq_len)
    n_train_tokens = len(train_rows) * args.seq_len  # packed tokens (eos included)
    print(
        f"tokenizer: vocab {len(tokenizer)}; train {n_train_tokens} tokens "
        f"({split_stats['train']['bytes'] / n_train_tokens:.2f} bytes/token) -> "
        f"{len(train_rows)} rows; valid {len(valid_rows)} rows of {args.seq_len}",
        flush=True,
    )

    model = build_model(args, tokenizer.eos_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)

    stats = train(model, train_rows, valid_rows, args)
    evals = final_evaluation(model, tokenizer, train_rows, valid_docs, valid_rows, args.seq_len)
    for name, e in evals.items():
        print(
            f"final {name:18s} ppl {e['perplexity']:8.2f}  top-1 p {e['mean_top1_prob']:.3f}  "
            f"mass outside top-64 {e['mean_mass_outside_top64']:.3f}  ({e['rows']} rows)",
            flush=True,
        )

    dtype = save_teacher(model, tokenizer, teacher_dir, data_dir)
    summary = {
        **stats,
        "parameters": n_params,
        "saved_dtype": dtype,
        "valid_loss": evals["valid"]["loss"],
        "valid_perplexity": evals["valid"]["perplexity"],
        "evaluation": evals,
        "train_tokens_per_epoch": n_train_tokens,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "peak_lr": args.lr,
        "warmup_steps": args.warmup,
        "seed": args.seed,
        "corpus": {
            "source": "CPython standard library .py source, unmodified (PSF License)",
            "python_version": platform.python_version(),
            "corpus_mb": args.corpus_mb,
            "splits": split_stats,
        },
        "eos_token": EOS_TOKEN,
        "eos_token_id": tokenizer.eos_token_id,
        "vocab_size": len(tokenizer),
        "cpu": cpu_name(),
        "threads": args.threads,
        "total_minutes": (time.perf_counter() - started) / 60,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv),
    }
    (teacher_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2), flush=True)
    print(f"data/ size: {dir_bytes(data_dir) / 2**20:.1f} MiB", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    main()
