"""Commands for black-box distillation data: generate (teacher-written answers) and stepbystep."""

from __future__ import annotations

import click

from teachercache.blackbox.generate import GenerateOptions
from teachercache.blackbox.templates import TEMPLATES
from teachercache.cli.options import dtype_option, field_option, runtime_options


def _g(name: str, *decls: str, **kwargs):
    return field_option(GenerateOptions, name, *decls, **kwargs)


@click.command("generate")
@_g("teacher", "--teacher", required=True)
@_g("prompts", "--prompts", required=True, type=click.Path(dir_okay=False))
@_g("out", "--out", required=True, type=click.Path(dir_okay=False))
@_g("template", "--template", type=click.Choice(TEMPLATES))
@_g("pool", "--pool", type=click.Path(dir_okay=False))
@_g("shots", "--shots")
@_g("template_file", "--template-file", type=click.Path(dir_okay=False))
@_g("max_new_tokens", "--max-new-tokens")
@_g("temperature", "--temperature")
@_g("top_p", "--top-p")
@_g("seed", "--seed")
@_g("stop", "--stop", multiple=True, default=(), help="Cut the answer at this string (repeatable).")
@_g("batch_size", "--batch-size")
@_g("prompt_format", "--prompt-format", type=click.Choice(["auto", "chat", "plain"]))
@_g("record_prompt", "--record-prompt", type=click.Choice(["full", "query"]))
@dtype_option(GenerateOptions)
@runtime_options(GenerateOptions, "teacher")
def generate_command(**options):
    """Let the teacher answer --prompts (instruction following, in-context learning or chain of thought)
    and write chat JSON Lines that `teachercache build` reads. Rerun the same command to resume.

    \b
    Example:
      teachercache generate --teacher Qwen/Qwen2.5-7B-Instruct --prompts q.jsonl --out answers.jsonl --template cot --pool demos.jsonl --shots 4 --stop "Question:"
    """
    from teachercache.blackbox.generate import generate

    summary = generate(GenerateOptions(**{**options, "stop": tuple(options["stop"])}))
    for line in summary.lines():
        click.echo(line)


@click.command("stepbystep")
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--label-repeat", type=click.IntRange(min=0), default=1, show_default=True, help="Times each label-task record is written.")
@click.option("--rationale-repeat", type=click.IntRange(min=0), default=1, show_default=True, help="Times each rationale-task record is written.")
def stepbystep_command(src, dst, label_repeat, rationale_repeat):
    """Turn `generate --template cot` output SRC into distilling-step-by-step records DST: per example a
    "[label] " task (query -> answer) and a "[rationale] " task (query -> rationale); weights by repetition.

    \b
    Example:
      teachercache stepbystep answers.jsonl tasks.jsonl --rationale-repeat 2
    """
    from teachercache.blackbox.stepbystep import step_by_step

    s = step_by_step(src, dst, label_repeat, rationale_repeat)
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(s.skipped.items())) or "none"
    click.echo(f"{dst}: {s.read} records read, {s.written} task records written; skipped: {skipped}")


COMMANDS = (generate_command, stepbystep_command)
