"""Commands of the student side: train (from a cache), eval (any causal LM), demo (the main job).

Flags fill the nested options of student.options (``--lr`` -> ``schedule.lr``, ``--ce-alpha`` ->
``kd.ce_weight``); their defaults and help come from those dataclasses.
"""

from __future__ import annotations

import json

import click

from teachercache.student.demo import DemoOptions
from teachercache.student.cross_tokenizer import CROSS_TOKENIZER_MODES
from teachercache.student.hint import HINT_KINDS
from teachercache.student.kd_types import LOSSES, TAILS
from teachercache.student.options import (CheckpointOptions, EvalOptions, HintOptions, KDOptions, LoaderOptions, ScheduleOptions,
                             TrainOptions, REPORT_TO)
from teachercache.cli.config import ConfigCommand, config_option, save_config
from teachercache.cli.options import (FiniteFloatRange, device_option, field_option, progress_option, runtime_options, split_groups,
                                      trust_remote_code_option)

GROUPS = {"schedule": ScheduleOptions, "kd": KDOptions, "hint": HintOptions, "loader": LoaderOptions,
          "eval": EvalOptions, "checkpoints": CheckpointOptions}


def _in(group: str, name: str, *decls: str, **kwargs):
    """A flag for field ``name`` of the nested options ``group`` of TrainOptions."""
    return field_option(GROUPS[group], name, *decls, dest=f"{group}__{name}", **kwargs)


@click.command("train", cls=ConfigCommand)
@config_option("schedule, kd, hint, loader, eval, checkpoints")
@field_option(TrainOptions, "cache", "--cache", required=True, type=click.Path(file_okay=False))
@field_option(TrainOptions, "student", "--student", required=True)
@field_option(TrainOptions, "out", "--out", required=True, type=click.Path(file_okay=False))
@_in("schedule", "steps", "--steps", type=click.IntRange(min=1))
@_in("schedule", "batch_size", "--batch-size", type=click.IntRange(min=1))
@_in("schedule", "grad_accum", "--grad-accum", type=click.IntRange(min=1))
@_in("schedule", "lr", "--lr", type=click.FloatRange(min=0, min_open=True))
@_in("schedule", "weight_decay", "--weight-decay", type=click.FloatRange(min=0))
@_in("schedule", "warmup_steps", "--warmup-steps", type=click.IntRange(min=0))
@_in("schedule", "min_lr_ratio", "--min-lr-ratio", type=click.FloatRange(0, 1))
@_in("schedule", "max_grad_norm", "--max-grad-norm", type=click.FloatRange(min=0))
@_in("kd", "loss", "--kd-loss", type=click.Choice(LOSSES))
@_in("kd", "tail", "--tail", type=click.Choice(TAILS))
@_in("kd", "temperature", "--temperature")
@_in("kd", "beta", "--beta")
@_in("kd", "alpha", "--skew-alpha")
@_in("kd", "ce_weight", "--ce-alpha")
@_in("kd", "kd_weight", "--kd-alpha")
@_in("hint", "layers", "--hint-layers")
@_in("hint", "weight", "--hint-alpha")
@_in("hint", "kind", "--hint-kind", type=click.Choice(HINT_KINDS))
@field_option(TrainOptions, "fused_head", "--fused-head")
@field_option(TrainOptions, "chunk_size", "--chunk-size", type=click.IntRange(min=1))
@_in("eval", "data", "--eval-data")
@_in("eval", "every", "--eval-every", type=click.IntRange(min=0))
@_in("eval", "rows", "--eval-rows", type=int)
@_in("checkpoints", "every", "--checkpoint-every", type=click.IntRange(min=0))
@_in("checkpoints", "resume", "--resume")
@field_option(TrainOptions, "seed", "--seed")
@_in("loader", "shuffle", "--shuffle/--no-shuffle")
@_in("loader", "num_workers", "--num-workers", type=click.IntRange(min=0))
@_in("loader", "prefetch_shards", "--prefetch-shards", type=click.IntRange(min=0))
@_in("loader", "cache_dir", "--cache-dir", type=click.Path(file_okay=False))
@_in("loader", "cache_dir_gb", "--cache-dir-gb", type=FiniteFloatRange(min=0, min_open=True))
@field_option(TrainOptions, "log_every", "--log-every", type=click.IntRange(min=1))
@field_option(TrainOptions, "report_to", "--report-to", type=click.Choice(REPORT_TO))
@field_option(TrainOptions, "max_nonfinite_steps", "--max-nonfinite-steps", type=click.IntRange(min=1))
@field_option(TrainOptions, "online_teacher", "--online-teacher")
@field_option(TrainOptions, "cross_tokenizer", "--cross-tokenizer", type=click.Choice(CROSS_TOKENIZER_MODES))
@field_option(TrainOptions, "unaligned_ce_weight", "--unaligned-ce-alpha", type=click.FloatRange(min=0))
@runtime_options(TrainOptions, "student")
def train_command(**values):
    """Train a student from a cache alone and save it as a Hugging Face model directory.

    Example: teachercache train --cache /tmp/demo-cache --student llama-small --out /tmp/student --steps 200
    """
    from teachercache.student.train import train

    top, groups = split_groups(values)
    options = TrainOptions(**top, **{name: GROUPS[name](**fields) for name, fields in groups.items()})
    result = train(options)
    if not result.complete:   # a complete run resumed again keeps the config.yaml it wrote
        save_config(result.out)
    if result.complete:
        click.echo(f"{result.out}: the run is already complete ({result.steps} steps, last loss "
                   f"{result.final_loss:.4f}); nothing to resume")
    else:
        click.echo(f"trained {result.steps} steps in {result.seconds:.1f} s, last loss {result.final_loss:.4f}; "
                   f"student saved to {result.out}")
    if result.eval:
        click.echo("eval: " + json.dumps(result.eval))


@click.command("eval")
@click.option("--model", "model_path", required=True, help="Model directory or hub id (any causal LM).")
@click.option("--data", required=True, help="A cache directory, or a text file (.jsonl/.parquet/.txt).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Rows per forward pass.")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True,
              help="Text files: tokens per row (at most the model's max_position_embeddings).")
@click.option("--max-rows", type=click.IntRange(min=1), default=None, help="Evaluate on at most this many rows.")
@device_option()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@trust_remote_code_option(None, "model")
def eval_command(model_path, data, batch_size, seq_len, max_rows, device, as_json, trust_remote_code):
    """Perplexity, bits per byte, calibration (ECE) and, on a cache, KD loss of any causal LM. On a cache the model's
    tokenizer must be the one the cache was built with (fingerprints compared); a text file is read with the model's
    own (bits per byte compare models whose tokenizers differ).

    Example: teachercache eval --model /tmp/student --data data/corpus/valid.parquet --max-rows 64
    """
    from teachercache.student.evaluate import evaluate_model, load_model

    model, tokenizer, dev = load_model(model_path, device, trust_remote_code)
    result = evaluate_model(model, data, tokenizer, batch_size=batch_size, seq_len=seq_len, max_rows=max_rows,
                            device=dev)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    for key, value in result.to_dict().items():
        if value is not None:
            click.echo(f"{key:18s} {value:.4f}" if isinstance(value, float) else f"{key:18s} {value}")


@click.command("demo", cls=ConfigCommand)
@config_option()
@field_option(DemoOptions, "out", "--out", type=click.Path(file_okay=False))
@field_option(DemoOptions, "steps", "--steps")
@field_option(DemoOptions, "max_docs", "--max-docs", type=int)
@field_option(DemoOptions, "sample_docs", "--sample-docs/--first-docs")
@field_option(DemoOptions, "student", "--student")
@field_option(DemoOptions, "eval_every", "--eval-every")
@field_option(DemoOptions, "eval_rows", "--eval-rows", type=int)
@progress_option(DemoOptions)
def demo_command(**options):
    """The main job on the bundled default: cache data/'s demo teacher over data/'s corpus, distil a
    student from the cache and a CE-only twin, evaluate all three, print a table and plot the curves.

    Example: teachercache demo --out runs/demo
    """
    from teachercache.student.demo import run_demo

    run_demo(DemoOptions(**options), echo=click.echo)
    save_config(options["out"])


COMMANDS = (train_command, eval_command, demo_command)
