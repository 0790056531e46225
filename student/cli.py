"""`teachercache train` and `teachercache eval`: click commands over student.train and student.evaluate.

They live in the student package and are added to the `teachercache` group by teachercache.cli, so the
teachercache package never imports student code at import time.
"""

from __future__ import annotations

import json

import click

from teachercache.kernels import LOSSES, TAILS


@click.command("train")
@click.option("--cache", required=True, type=click.Path(file_okay=False), help="Cache directory to learn from.")
@click.option("--student", required=True,
              help="Pretrained directory or hub id, a config .json (fresh weights), or a preset: "
                   "llama-tiny, llama-small, llama-base.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the trained student.")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Rows per micro-batch per process.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
              help="Micro-batches per optimizer step.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="Peak learning rate (AdamW).")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.01, show_default=True)
@click.option("--warmup-steps", type=click.IntRange(min=0), default=50, show_default=True,
              help="Linear warmup, then cosine decay.")
@click.option("--min-lr-ratio", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="Final lr as a share of --lr.")
@click.option("--max-grad-norm", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Gradient clipping (0: off).")
@click.option("--kd-loss", type=click.Choice(LOSSES), default=None,
              help="KD loss [default: sampled_ce for sampled caches, else forward_kl].")
@click.option("--tail", type=click.Choice(TAILS), default="rest", show_default=True,
              help="rest: a (k+1)-th bucket for the unstored mass; renormalize: the teacher's stored mass scaled to 1 (Axolotl's loss).")
@click.option("--temperature", default=1.0, show_default=True, help="KD temperature (loss scaled by T²).")
@click.option("--beta", default=0.5, show_default=True, help="jsd: mixture weight.")
@click.option("--skew-alpha", default=0.1, show_default=True, help="skew_kl / skew_reverse_kl: α.")
@click.option("--ce-alpha", default=0.0, show_default=True, help="Weight of the hard-label cross-entropy.")
@click.option("--kd-alpha", default=1.0, show_default=True, help="Weight of the KD loss.")
@click.option("--hint-layers", default="", help="Hint pairs STUDENT:TEACHER, e.g. 2:4 (cache needs those layers).")
@click.option("--hint-alpha", default=1.0, show_default=True, help="Weight of the hint loss.")
@click.option("--hint-kind", type=click.Choice(["mse", "cosine"]), default="mse", show_default=True)
@click.option("--fused-head", is_flag=True, help="LM head + loss in chunks: no [batch, seq, vocab] logits.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=1024, show_default=True,
              help="--fused-head: positions per chunk.")
@click.option("--eval-data", default=None, help="Held-out cache directory or text file for evaluation.")
@click.option("--eval-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Evaluate every N steps (0: only at the end).")
@click.option("--eval-rows", type=int, default=None, help="Evaluate on at most this many rows.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Checkpoint every N steps (0: never).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out.")
@click.option("--seed", default=0, show_default=True)
@click.option("--no-shuffle", is_flag=True, help="Read rows in file order.")
@click.option("--num-workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="DataLoader worker processes.")
@click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True,
              help="Write metrics every N steps.")
@click.option("--online-teacher", default=None, help="Baseline: KD from this live teacher instead of the cache.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--trust-remote-code", is_flag=True, help="Let the student repository run its own code.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train_command(cache, student, out, steps, batch_size, grad_accum, lr, weight_decay, warmup_steps, min_lr_ratio,
                  max_grad_norm, kd_loss, tail, temperature, beta, skew_alpha, ce_alpha, kd_alpha, hint_layers,
                  hint_alpha, hint_kind, fused_head, chunk_size, eval_data, eval_every, eval_rows,
                  checkpoint_every, resume, seed, no_shuffle, num_workers, log_every, online_teacher, device,
                  trust_remote_code, no_progress):
    """Train a student from a cache alone and save it as a Hugging Face model directory.

    Example: teachercache train --cache /tmp/demo-cache --student llama-small --out /tmp/student --steps 200
    """
    from .train import TrainOptions, train

    options = TrainOptions(
        cache=cache, student=student, out=out, steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        weight_decay=weight_decay, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio,
        max_grad_norm=max_grad_norm, kd_loss=kd_loss, tail=tail, temperature=temperature, beta=beta,
        skew_alpha=skew_alpha, ce_alpha=ce_alpha, kd_alpha=kd_alpha, hint_layers=hint_layers,
        hint_alpha=hint_alpha, hint_kind=hint_kind, fused_head=fused_head, chunk_size=chunk_size,
        eval_data=eval_data, eval_every=eval_every if eval_every else (steps if eval_data else 0),
        eval_rows=eval_rows, checkpoint_every=checkpoint_every, resume=resume, seed=seed, shuffle=not no_shuffle,
        num_workers=num_workers, log_every=log_every, online_teacher=online_teacher, device=device,
        trust_remote_code=trust_remote_code, progress=not no_progress)
    result = train(options)
    click.echo(f"trained {result.steps} steps in {result.seconds:.1f} s, last loss {result.final_loss:.4f}; "
               f"student saved to {result.out}")
    if result.eval:
        click.echo("eval: " + json.dumps(result.eval))


@click.command("eval")
@click.option("--model", "model_path", required=True, help="Model directory or hub id (any causal LM).")
@click.option("--data", required=True, help="A cache directory, or a text file (.jsonl/.parquet/.txt).")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--seq-len", default=512, show_default=True, help="Text files: tokens per row.")
@click.option("--max-rows", type=int, default=None, help="Evaluate on at most this many rows.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--trust-remote-code", is_flag=True)
def eval_command(model_path, data, batch_size, seq_len, max_rows, device, as_json, trust_remote_code):
    """Perplexity, calibration (ECE) and, on a cache, KD loss of any causal LM.

    Example: teachercache eval --model /tmp/student --data data/corpus/valid.parquet --max-rows 64
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluate import evaluate_model

    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=trust_remote_code).to(dev)
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise click.ClickException(f"--model {model_path}: cannot load a causal LM and its tokenizer ({e})")
    result = evaluate_model(model, data, tokenizer, batch_size=batch_size, seq_len=seq_len, max_rows=max_rows,
                            device=dev)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    for key, value in result.to_dict().items():
        if value is not None:
            click.echo(f"{key:18s} {value:.4f}" if isinstance(value, float) else f"{key:18s} {value}")


@click.command("demo")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Directory for the cache, both students, the table and the plot.")
@click.option("--steps", default=400, show_default=True, help="Optimizer steps per student.")
@click.option("--max-docs", default=60, show_default=True, help="Training documents to cache.")
@click.option("--student", default="llama-small", show_default=True, help="Student preset, config or path.")
@click.option("--eval-every", default=100, show_default=True, help="Held-out evaluation every N steps.")
@click.option("--eval-rows", type=int, default=None, help="Evaluate on at most this many held-out rows.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def demo_command(out, steps, max_docs, student, eval_every, eval_rows, no_progress):
    """The main job on the bundled default: cache data/'s demo teacher over data/'s corpus, distil a
    student from the cache and a CE-only twin, evaluate all three, print a table and plot the curves.

    Example: teachercache demo --out runs/demo
    """
    from .demo import DemoOptions, run_demo

    run_demo(DemoOptions(out=out, steps=steps, max_docs=max_docs, student=student, eval_every=eval_every,
                         eval_rows=eval_rows, progress=not no_progress), echo=click.echo)
