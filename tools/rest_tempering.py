"""Measure what tail ``rest`` approximates at T != 1, on the demo teacher's full distributions.

The loss tempers the teacher's k+1 buckets as p_j^(1/T) and r^(1/T): exact for the ratios between stored
ids, but the rest bucket holds many ids, and the full distribution's tempered rest is the sum over them of
p_v^(1/T). For each k and T this prints, over the held-out rows' positions: the rest bucket's share of the
tempered teacher mass as the loss takes it and as the full distribution gives it, their mean absolute
difference, the KL between the two tempered bucket distributions, and how often the bounds that
``student.kd_types.rest_tempering`` computes from the stored probabilities contain the full value.

    python tools/rest_tempering.py                 # k in {8, 64}, T in {0.5, 2, 4}, 32 rows of 256 tokens

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from teachercache.student.kd_types import SparseTargets, rest_tempering

ROOT = Path(__file__).resolve().parents[1]


def teacher_logprobs(rows: int, seq_len: int) -> torch.Tensor:
    """[positions, V] float64 log-probs of the demo teacher over the first held-out rows."""
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "data" / "teacher")
    model = AutoModelForCausalLM.from_pretrained(ROOT / "data" / "teacher").eval()
    texts = pq.read_table(ROOT / "data" / "corpus" / "valid.parquet", columns=["text"]).column("text").to_pylist()
    ids = [t for text in texts for t in tokenizer(text)["input_ids"]]
    batch = torch.tensor(ids[:rows * seq_len]).reshape(rows, seq_len)
    out = []
    with torch.no_grad():
        for a in range(0, rows, 8):
            out.append(torch.log_softmax(model(batch[a:a + 8]).logits.double(), -1).reshape(-1, model.config.vocab_size))
    return torch.cat(out)


def measure(logp: torch.Tensor, k: int, temperature: float) -> dict:
    top = logp.topk(k, dim=-1)
    rest = (1 - top.values.exp().sum(-1)).clamp_min(0)
    inv_t = 1.0 / temperature
    stored_t = (top.values * inv_t).exp().sum(-1)
    outside = torch.ones_like(logp, dtype=torch.bool).scatter_(1, top.indices, False)
    full_rest_t = torch.where(outside, logp * inv_t, -math.inf).logsumexp(-1).exp()
    keep = rest > 0
    approx_rest_t = rest ** inv_t
    share_full = (full_rest_t / (stored_t + full_rest_t))[keep]
    share_approx = (approx_rest_t / (stored_t + approx_rest_t))[keep]

    def buckets(rest_t):   # tempered, normalised (k + 1) buckets
        b = torch.cat([(top.values * inv_t).exp(), rest_t[:, None]], 1)
        return b / b.sum(-1, keepdim=True)

    p_full, p_approx = buckets(full_rest_t)[keep], buckets(approx_rest_t)[keep]
    kl = (torch.where(p_full > 0, p_full * (p_full.log() - p_approx.log()), 0.0)).sum(-1)
    n, vocab = logp.shape
    targets = SparseTargets(torch.arange(0, n * k + 1, k), top.indices.reshape(-1), top.values.reshape(-1).float(),
                            rest.float())
    bounds = rest_tempering(targets, temperature, vocab)
    # per-position containment of the full value by the bounds
    p_min = top.values.exp().min(-1).values
    conc = rest * p_min ** (inv_t - 1)
    spread = (vocab - k) ** (1 - inv_t) * approx_rest_t
    lo = torch.minimum(conc / (stored_t + conc), spread / (stored_t + spread))[keep]
    hi = torch.maximum(conc / (stored_t + conc), spread / (stored_t + spread))[keep]
    inside = ((share_full >= lo * (1 - 1e-9)) & (share_full <= hi * (1 + 1e-9))).double().mean()
    return {"k": k, "temperature": temperature, "positions": int(keep.sum()),
            "rest_mass": round(float(rest[keep].mean()), 4),
            "tempered_rest_share_full": round(float(share_full.mean()), 4),
            "tempered_rest_share_loss": round(float(share_approx.mean()), 4),
            "mean_abs_error": round(float((share_full - share_approx).abs().mean()), 4),
            "max_abs_error": round(float((share_full - share_approx).abs().max()), 4),
            "kl_full_to_loss_buckets": round(float(kl.mean()), 4),
            "bounds_low": round(bounds["low"], 4), "bounds_high": round(bounds["high"], 4),
            "bounds_contain_full": round(float(inside), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--k", type=int, nargs="*", default=[8, 64])
    ap.add_argument("--temperature", type=float, nargs="*", default=[0.5, 2.0, 4.0])
    args = ap.parse_args()
    logp = teacher_logprobs(args.rows, args.seq_len)
    results = []
    for k in args.k:
        for t in args.temperature:
            row = measure(logp, k, t)
            results.append(row)
            print(f"k={k:3d} T={t:g}: rest {row['rest_mass']:.3f}; tempered rest share full "
                  f"{row['tempered_rest_share_full']:.3f} vs loss {row['tempered_rest_share_loss']:.3f} "
                  f"(|diff| mean {row['mean_abs_error']:.3f}, max {row['max_abs_error']:.3f}; "
                  f"KL {row['kl_full_to_loss_buckets']:.3f} nats); bounds [{row['bounds_low']:.3f}, "
                  f"{row['bounds_high']:.3f}] contain the full value at {row['bounds_contain_full']:.1%}",
                  flush=True)
    print(json.dumps({"bench": "rest_tempering", "positions": logp.shape[0], "results": results}))


if __name__ == "__main__":
    main()
