"""Benchmark the fused sparse-KD kernel (numba, CPU) against the torch reference, side by side.

For N positions and vocabulary V, with top-k targets (k = 64, tail ``rest``) and sampled targets (64 draws,
about a dozen distinct ids) taken from a peaked teacher distribution:

* fwd+bwd wall time of ``sparse_kd_loss`` with the numba kernel vs the torch reference
  (log_softmax + gather + autograd), best of R runs each, interleaved; max |difference| of loss and
  gradient between the two (on the first 512 positions: the full-size gradients are not kept, so the
  V = 152k case fits in 24 GB);
* the KD loss's cost relative to a plain CE loss (``F.cross_entropy``) on the same logits, and of the
  fused CE + KD kernel call relative to CE alone;
* peak extra resident memory (VmHWM reset via /proc/self/clear_refs, in a fresh subprocess per case) of
  the LM head + loss with the head fused in chunks vs unfused (logits materialised, then the kernel or
  the torch reference);
* agreement of the two on a confident student (the teacher's top-4 ids raised by a logit gap up to 80).

    python tools/bench_kernels.py                  # N=4096, V in {32000, 152064}
    python tools/bench_kernels.py --quick          # N=1024, V=32000

Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from teachercache.student.fused_head import fused_linear_sparse_kd
from teachercache.student.losses import KDConfig, SparseTargets, sparse_kd_loss


def make_targets(n: int, vocab: int, kind: str, seed: int = 0):
    """Peaked teacher distributions, top-64 or 64 draws, and a student's logits.

    Teacher logits are N(0, σ²) with σ = 6.5 (V = 32k) or 7 (V = 152k): 64 draws then hold about 12
    distinct ids and top-64 leaves about 1-2% of the mass outside, as a trained LM's would. Built 256
    rows at a time so that no second [N, V] tensor exists besides the student's logits.
    """
    g = torch.Generator().manual_seed(seed)
    sigma = 6.5 if vocab < 100_000 else 7.0
    offsets, ids, logprobs, rest, counts = [0], [], [], [], []
    for a in range(0, n, 256):
        teacher = torch.log_softmax(torch.randn(min(256, n - a), vocab, generator=g) * sigma, -1)
        if kind == "topk":
            top = teacher.topk(64, dim=-1)
            ids.append(top.indices.reshape(-1))
            logprobs.append(top.values.reshape(-1))
            rest.append((1 - top.values.exp().sum(-1)).clamp_min(0))
            offsets += [offsets[-1] + 64 * (i + 1) for i in range(len(teacher))]
        else:
            draws = torch.multinomial(teacher.exp(), 64, replacement=True, generator=g)
            for i in range(len(teacher)):
                u, c = draws[i].unique(return_counts=True)
                ids.append(u)
                counts.append(c.float())
                logprobs.append(teacher[i, u])
                offsets.append(offsets[-1] + len(u))
        del teacher
    if kind == "topk":
        targets = SparseTargets(torch.tensor(offsets), torch.cat(ids), torch.cat(logprobs), torch.cat(rest))
        config = KDConfig(loss="forward_kl", tail="rest")
    else:
        targets = SparseTargets(torch.tensor(offsets), torch.cat(ids), torch.cat(logprobs), None, torch.cat(counts))
        config = KDConfig(loss="sampled_ce")
    student = torch.randn(n, vocab, generator=g) * 2
    labels = torch.randint(0, vocab, (n,), generator=g)
    return student, targets, labels, config


def fwd_bwd(fn, logits):
    """Seconds of one fwd+bwd, and (loss, grad); the clone of the logits is not timed."""
    x = logits.clone().requires_grad_(True)
    t0 = time.perf_counter()
    loss = fn(x)
    loss.backward()
    return time.perf_counter() - t0, loss.detach(), x.grad


def timing_case(n: int, vocab: int, kind: str, repeats: int) -> dict:
    logits, targets, labels, config = make_targets(n, vocab, kind)
    ce_cfg = KDConfig(**{**config.__dict__, "ce_weight": 1.0})

    def fns(tg):
        return {"numba": lambda x: sparse_kd_loss(x, tg, None, None, config, backend="numba")[0],
                "torch": lambda x: sparse_kd_loss(x, tg, None, None, config, backend="torch")[0],
                "numba_ce_kd": lambda x: sparse_kd_loss(x, tg, labels[:x.shape[0]], None, ce_cfg,
                                                        backend="numba")[0],
                "ce": lambda x: torch.nn.functional.cross_entropy(x, labels[:x.shape[0]])}
    # agreement on the first 512 positions (the full-size gradients are timed, not kept)
    part = targets.slice(0, min(n, 512))
    small = {name: fwd_bwd(fn, logits[:512])[1:] for name, fn in fns(part).items() if name in ("numba", "torch")}
    loss_diff = abs(float(small["numba"][0]) - float(small["torch"][0]))
    grad_diff = float((small["numba"][1] - small["torch"][1]).abs().max())
    del small
    best = {}
    for _ in range(repeats):
        for name, fn in fns(targets).items():
            seconds = fwd_bwd(fn, logits)[0]
            best[name] = min(best.get(name, float("inf")), seconds)
    distinct = float((targets.offsets[1:] - targets.offsets[:-1]).float().mean())
    return {"n": n, "vocab": vocab, "targets": kind, "ids_per_position": round(distinct, 2),
            "numba_s": round(best["numba"], 4), "torch_s": round(best["torch"], 4),
            "speedup": round(best["torch"] / best["numba"], 2),
            "ce_s": round(best["ce"], 4), "kd_over_ce": round(best["numba"] / best["ce"], 2),
            "ce_plus_kd_over_ce": round(best["numba_ce_kd"] / best["ce"], 2),
            "max_loss_diff": loss_diff, "max_grad_diff": grad_diff}


def confident_agreement(vocab: int, n: int = 512) -> list[dict]:
    """numba vs torch on a student growing confident: the teacher's top-4 ids (top-64, rest bucket) raised by
    a logit gap of 0 … 80 in the student's logits; max |difference| of loss and gradient."""
    logits, targets, _, config = make_targets(n, vocab, "topk")
    rows = []
    for gap in (0.0, 20.0, 40.0, 80.0):
        z = logits.clone()
        first = targets.offsets[:-1]
        for j in range(4):
            z[torch.arange(n), targets.ids[first + j]] += gap
        got = {}
        for backend in ("numba", "torch"):
            x = z.clone().requires_grad_(True)
            loss = sparse_kd_loss(x, targets, None, None, config, backend=backend)[0]
            loss.backward()
            got[backend] = (loss.detach().double(), x.grad)
        rows.append({"vocab": vocab, "gap": gap, "loss": float(got["numba"][0]),
                     "max_loss_diff": abs(float(got["numba"][0] - got["torch"][0])),
                     "max_grad_diff": float((got["numba"][1] - got["torch"][1]).abs().max())})
    return rows


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def memory_child(n: int, vocab: int, hidden: int, mode: str, chunk: int) -> None:
    """Run in a subprocess: peak extra RSS of head + loss fwd+bwd for one mode."""
    _, targets, labels, config = make_targets(n, vocab, "topk")
    h = (torch.randn(n, hidden) * 0.1).requires_grad_(True)
    w = (torch.randn(vocab, hidden) * 0.05).requires_grad_(True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                   # reset VmHWM to the current RSS
    base = _rss("VmRSS:")
    if mode == "chunked":
        loss = fused_linear_sparse_kd(h, w, targets, labels, None, config, chunk_size=chunk)[0]
    else:
        logits = h @ w.T
        loss = sparse_kd_loss(logits, targets, labels, None, config,
                              backend="numba" if mode == "unfused_numba" else "torch")[0]
    loss.backward()
    print(json.dumps({"extra_bytes": _rss("VmHWM:") - base}))


def memory_case(n: int, vocab: int, hidden: int, chunk: int) -> dict:
    out = {}
    for mode in ("chunked", "unfused_numba", "unfused_torch"):
        proc = subprocess.run([sys.executable, __file__, "--memory-child", mode, "--n", str(n), "--vocab",
                               str(vocab), "--hidden", str(hidden), "--chunk", str(chunk)],
                              capture_output=True, text=True, check=True)
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])["extra_bytes"]
    return {"n": n, "vocab": vocab, "hidden": hidden, "chunk": chunk,
            **{f"{k}_mb": round(v / 2**20) for k, v in out.items()},
            "chunked_over_unfused_torch": round(out["chunked"] / out["unfused_torch"], 3),
            "chunked_over_unfused_numba": round(out["chunked"] / out["unfused_numba"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--vocab", type=int, nargs="*", default=[32000, 152064])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-child", choices=["chunked", "unfused_numba", "unfused_torch"])
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.n, args.vocab[0], args.hidden, args.memory_child, args.chunk)
        return
    if args.quick:
        args.n, args.vocab, args.repeats = 1024, [32000], 2
    import numba
    print(f"torch threads {torch.get_num_threads()}, numba threads {numba.get_num_threads()}, "
          f"layer {os.environ.get('NUMBA_THREADING_LAYER', 'workqueue')}", flush=True)
    timings, memory = [], []
    for vocab in args.vocab:
        for kind in ("topk", "sample"):
            row = timing_case(args.n, vocab, kind, args.repeats)
            timings.append(row)
            print(f"N={row['n']} V={vocab} {kind:6s} ids/pos {row['ids_per_position']:6.2f}  numba "
                  f"{row['numba_s']:.3f}s  torch {row['torch_s']:.3f}s  speedup {row['speedup']:.2f}x  "
                  f"KD/CE {row['kd_over_ce']:.2f}  (CE+KD)/CE {row['ce_plus_kd_over_ce']:.2f}  "
                  f"max diff loss {row['max_loss_diff']:.1e} grad {row['max_grad_diff']:.1e}", flush=True)
        row = memory_case(args.n, vocab, args.hidden, args.chunk)
        memory.append(row)
        print(f"N={args.n} V={vocab} H={args.hidden} peak extra RSS: chunked({args.chunk}) "
              f"{row['chunked_mb']} MB, unfused+numba {row['unfused_numba_mb']} MB, unfused+torch "
              f"{row['unfused_torch_mb']} MB -> ratios {row['chunked_over_unfused_torch']} / "
              f"{row['chunked_over_unfused_numba']}", flush=True)
    confident = [row for vocab in args.vocab for row in confident_agreement(vocab)]
    for row in confident:
        print(f"V={row['vocab']} confident student, logit gap {row['gap']:g}: loss {row['loss']:.4f}, numba vs torch "
              f"max diff loss {row['max_loss_diff']:.1e} grad {row['max_grad_diff']:.1e}", flush=True)
    print(json.dumps({"bench": "kernels", "timings": timings, "memory": memory, "confident": confident}))


if __name__ == "__main__":
    main()
