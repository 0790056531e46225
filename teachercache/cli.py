"""The `teachercache` command: a thin click layer over the library.

Each command maps its flags onto one library call and prints the result. Errors the user can cause are
TeachercacheError subclasses; the group turns them into one line on stderr and exit code 1.
"""

from __future__ import annotations

import json

import click

from . import __version__
from .errors import TeachercacheError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TeachercacheError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="teachercache")
def main():
    """teachercache: run a teacher once, cache its sparse next-token distributions, distil students
    from the cache alone."""


def _layers(ctx, param, value):
    try:
        return tuple(int(x) for x in value.split(",") if x.strip()) if value else ()
    except ValueError:
        raise click.BadParameter(f"{value!r}: give layer indices separated by commas, e.g. 3,6") from None


@main.command("build")
@click.option("--teacher", required=True, help="Hub id or local directory of the teacher model.")
@click.option("--data", "data", required=True, multiple=True,
              help="Input: .jsonl/.parquet/.txt/.arrow file or a directory of them (repeatable).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache directory to write.")
@click.option("--seq-len", default=2048, show_default=True, help="Tokens per row.")
@click.option("--packing", type=click.Choice(["concat", "document"]), default="concat", show_default=True,
              help="concat: join documents with EOS and cut rows; document: one document per row.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Rows per forward pass.")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Teacher dtype (auto: bf16 on GPU, fp32 on CPU).")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--target", "kind", type=click.Choice(["topk", "nucleus", "sample"]), default="topk",
              show_default=True, help="What to store per position.")
@click.option("--k", default=64, show_default=True, help="topk: ids per position.")
@click.option("--top-p", default=0.95, show_default=True, help="nucleus: mass to reach.")
@click.option("--min-k", default=1, show_default=True, help="nucleus: fewest ids per position.")
@click.option("--max-k", default=128, show_default=True, help="nucleus: most ids per position.")
@click.option("--samples", default=64, show_default=True, help="sample: draws per position.")
@click.option("--seed", default=0, show_default=True, help="sample: seed of the draws.")
@click.option("--temperature", default=1.0, show_default=True, help="Teacher softmax temperature.")
@click.option("--hidden-layers", callback=_layers, default="", help="Hidden states to store, e.g. 3,6.")
@click.option("--hidden-dtype", type=click.Choice(["bfloat16", "float16"]), default="bfloat16", show_default=True)
@click.option("--text-field", default="text", show_default=True, help="Field/column holding the text.")
@click.option("--max-docs", type=int, default=None, help="Read at most this many documents.")
@click.option("--shard-mb", type=click.FloatRange(min=0, min_open=True), default=512, show_default=True,
              help="Close a shard at this many MB (fractions allowed, e.g. 0.05).")
@click.option("--zstd-level", type=click.IntRange(1, 22), default=1, show_default=True,  # shards.ZSTD_LEVEL
              help="Shard compression (19: smaller, slower).")
@click.option("--resume", is_flag=True, help="Continue an interrupted build in --out.")
@click.option("--overwrite", is_flag=True, help="Replace whatever --out holds.")
@click.option("--trust-remote-code", is_flag=True, help="Let the teacher repository run its own code.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def build_command(teacher, data, out, seq_len, packing, batch_size, dtype, device, kind, k, top_p, min_k,
                  max_k, samples, seed, temperature, hidden_layers, hidden_dtype, text_field, max_docs,
                  shard_mb, zstd_level, resume, overwrite, trust_remote_code, no_progress):
    """Run the teacher once over --data and write the cache to --out.

    \b
    Example:
      teachercache build --teacher data/teacher --data data/corpus/valid.parquet --out /tmp/demo-cache --seq-len 256
    """
    from .build import BuildOptions, build_cache
    from .data import DataOptions
    from .manifest import TargetSpec

    targets = TargetSpec(kind=kind, k=k if kind == "topk" else None,
                         top_p=top_p if kind == "nucleus" else None, min_k=min_k if kind == "nucleus" else None,
                         max_k=max_k if kind == "nucleus" else None, samples=samples if kind == "sample" else None,
                         seed=seed if kind == "sample" else None, temperature=temperature)
    options = BuildOptions(
        teacher=teacher, out=out, targets=targets, batch_size=batch_size, dtype=dtype, device=device,
        data=DataOptions(paths=tuple(data), seq_len=seq_len, packing=packing, text_field=text_field,
                         max_docs=max_docs),
        hidden_layers=hidden_layers, hidden_dtype=hidden_dtype, shard_bytes=max(1, int(shard_mb * (1 << 20))),
        zstd_level=zstd_level, resume=resume, overwrite=overwrite, trust_remote_code=trust_remote_code,
        progress=not no_progress)
    result = build_cache(options)
    if result.rows:
        click.echo(f"{out}: {result.rows:,} rows, {result.tokens:,} tokens, {result.bytes / result.tokens:.1f} "
                   f"bytes/token, {result.seconds:.1f} s ({result.tokens / result.seconds:,.0f} tokens/s)")


@main.command("inspect")
@click.argument("cache", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--sample-batches", type=click.IntRange(min=0), default=4, show_default=True,
              help="Record batches per shard re-compressed to split bytes by column.")
def inspect_command(cache, as_json, sample_batches):
    """Show what is in CACHE: totals, bytes per token by column, targets, fingerprints, and the
    distributions that matter for distillation (captured mass, entropy, ids per position, rank of the
    actual next token), per shard too.

    \b
    Example:
      teachercache inspect /tmp/demo-cache --json > report.json
    """
    from .inspect import format_report, inspect_cache

    report = inspect_cache(cache, sample_batches=sample_batches)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@main.command("verify")
@click.argument("cache", type=click.Path(file_okay=False))
@click.option("--deep", is_flag=True, help="Also decode every row and check its values (ids, masses, counts).")
def verify_command(cache, deep):
    """Check CACHE: manifest, version, checksums, schemas, counts; with --deep every row's values too,
    each fault named by shard, row and position. Exits 1 on any fault.

    \b
    Example:
      teachercache verify /tmp/demo-cache --deep
    """
    from .verify import verify_cache

    faults = verify_cache(cache, deep=deep)
    for fault in faults:
        click.echo(f"FAULT {fault}", err=True)
    if faults:
        raise SystemExit(1)
    click.echo(f"{cache}: OK")


@main.command("show")
@click.argument("cache", type=click.Path(file_okay=False))
@click.option("--row", type=int, required=True, help="Row number in the cache (0-based).")
@click.option("--positions", default=None, help="Token range a:b of the row to list (default: all).")
@click.option("--top", default=5, show_default=True, help="Teacher alternatives per position.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False), default=None,
              help="Also write a self-contained HTML page to this file.")
def show_command(cache, row, positions, top, html_file):
    """Print a row of CACHE as text, and per position the actual next token with the teacher's top
    stored alternatives and their probabilities (exp of the cache's log-probs).

    \b
    Example:
      teachercache show /tmp/demo-cache --row 3 --positions 0:20 --top 5 --html row3.html
    """
    import sys

    from .show import format_html, format_text, parse_positions, show_row

    view = show_row(cache, row, parse_positions(positions), top)
    click.echo(format_text(view, colour=sys.stdout.isatty()))
    if html_file:
        with open(html_file, "w", encoding="utf-8") as f:
            f.write(format_html(view))


@main.command("plot")
@click.argument("cache", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the PNG files.")
def plot_command(cache, out):
    """Draw the distributions of `inspect` (captured mass, entropy, ids per position, rank of the next
    token, shards) as PNG figures in --out.

    \b
    Example:
      teachercache plot /tmp/demo-cache --out /tmp/demo-plots
    """
    from .plot import plot_cache

    for path in plot_cache(cache, out):
        click.echo(str(path))


@main.command("diff")
@click.argument("cache_a", type=click.Path(file_okay=False))
@click.argument("cache_b", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--worst", default=10, show_default=True, help="Rows to list, largest mean KL first.")
def diff_command(cache_a, cache_b, as_json, worst):
    """KL(A||B) per position between two caches of the same rows: mean, p50, p99, max and the worst rows.

    \b
    Example:
      teachercache diff /tmp/cache-k64 /tmp/cache-k8 --json
    """
    from .diff import DiffOptions, diff_caches, format_diff

    report = diff_caches(cache_a, cache_b, DiffOptions(worst=worst))
    click.echo(json.dumps(report, indent=2) if as_json else format_diff(report))


@main.command("export")
@click.argument("cache", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["axolotl", "hf"]), default="axolotl", show_default=True,
              help="axolotl: one parquet file of Axolotl KD columns; hf: a datasets save_to_disk directory.")
@click.option("--out", required=True, type=click.Path(), help="Output file (axolotl) or directory (hf).")
@click.option("--no-renormalize", is_flag=True, help="axolotl: keep full-vocabulary log-probs.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def export_command(cache, fmt, out, no_renormalize, overwrite):
    """Write CACHE as a dataset other trainers read (Axolotl's KD plugin, Hugging Face datasets).

    \b
    Example:
      teachercache export /tmp/demo-cache --format axolotl --out /tmp/demo-kd.parquet
    """
    from .export import ExportOptions, export_cache

    rows = export_cache(cache, out, ExportOptions(format=fmt, renormalize=not no_renormalize,
                                                  overwrite=overwrite))
    click.echo(f"{out}: {rows:,} rows")


@main.command("import-vllm")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--tokenizer", required=True, type=click.Path(file_okay=False),
              help="Directory of the teacher's tokenizer (copied into the cache).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache directory to write.")
@click.option("--k", type=int, default=None, help="Ids per position (default: the fewest any position has).")
@click.option("--teacher", default="vllm", show_default=True, help="Teacher name recorded in the manifest.")
@click.option("--overwrite", is_flag=True, help="Replace whatever --out holds.")
def import_vllm_command(file, tokenizer, out, k, teacher, overwrite):
    """Build a cache from vLLM prompt_logprobs (JSONL, one record per prompt with prompt_token_ids and
    prompt_logprobs).

    \b
    Example:
      teachercache import-vllm logprobs.jsonl --tokenizer Qwen2.5-7B/ --out /tmp/vllm-cache --k 20
    """
    from .vllm import VllmImportOptions, import_vllm

    manifest = import_vllm(file, tokenizer, out, VllmImportOptions(k=k, teacher=teacher, overwrite=overwrite))
    click.echo(f"{out}: {manifest.totals.rows:,} rows, {manifest.totals.target_positions:,} target positions")


@main.command("generate")
@click.option("--teacher", required=True, help="Hub id or local directory of the teacher (a causal LM).")
@click.option("--prompts", required=True, type=click.Path(dir_okay=False),
              help="JSON Lines of prompts: instruction, optional input and id.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Chat JSON Lines to write; appended to, prompts already there are skipped (resume).")
@click.option("--template", type=click.Choice(["instruction", "icl", "cot"]), default="instruction",
              show_default=True, help="Prompt template (docs/blackbox.md).")
@click.option("--pool", type=click.Path(dir_okay=False), default=None,
              help="icl/cot: JSON Lines of demonstrations (instruction, input, output, rationale).")
@click.option("--shots", default=3, show_default=True, help="icl/cot: demonstrations per prompt.")
@click.option("--template-file", type=click.Path(dir_okay=False), default=None,
              help="icl/cot: demonstration template (str.format fields {query} {output} {rationale} ...).")
@click.option("--max-new-tokens", default=256, show_default=True)
@click.option("--temperature", default=0.7, show_default=True, help="0: greedy.")
@click.option("--top-p", default=0.95, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Each prompt is seeded from (seed, id).")
@click.option("--stop", multiple=True, help="Cut the answer at this string (repeatable).")
@click.option("--batch-size", default=8, show_default=True, help="Prompts per generate call.")
@click.option("--prompt-format", type=click.Choice(["auto", "chat", "plain"]), default="auto", show_default=True,
              help="auto: the tokenizer's chat template when it has one.")
@click.option("--record-prompt", type=click.Choice(["full", "query"]), default="full", show_default=True,
              help="User message written: the full prompt, or just the query.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True)
@click.option("--trust-remote-code", is_flag=True, help="Let the teacher repository run its own code.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def generate_command(teacher, prompts, out, template, pool, shots, template_file, max_new_tokens, temperature,
                     top_p, seed, stop, batch_size, prompt_format, record_prompt, device, dtype, trust_remote_code,
                     no_progress):
    """Let the teacher answer --prompts (instruction following, in-context learning or chain of thought)
    and write chat JSON Lines that `teachercache build` reads. Rerun the same command to resume.

    \b
    Example:
      teachercache generate --teacher Qwen/Qwen2.5-7B-Instruct --prompts q.jsonl --out answers.jsonl --template cot --pool demos.jsonl --shots 4 --stop "Question:"
    """
    from .generate import GenerateOptions, generate

    summary = generate(GenerateOptions(
        teacher=teacher, prompts=prompts, out=out, template=template, pool=pool, shots=shots,
        template_file=template_file, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        seed=seed, stop=tuple(stop), batch_size=batch_size, prompt_format=prompt_format,
        record_prompt=record_prompt, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
        progress=not no_progress))
    for line in summary.lines():
        click.echo(line)


@main.command("stepbystep")
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--label-repeat", default=1, show_default=True, help="Times each label-task record is written.")
@click.option("--rationale-repeat", default=1, show_default=True, help="Times each rationale-task record is written.")
def stepbystep_command(src, dst, label_repeat, rationale_repeat):
    """Turn `generate --template cot` output SRC into distilling-step-by-step records DST: per example a
    "[label] " task (query -> answer) and a "[rationale] " task (query -> rationale); weights by repetition.

    \b
    Example:
      teachercache stepbystep answers.jsonl tasks.jsonl --rationale-repeat 2
    """
    from .stepbystep import step_by_step

    s = step_by_step(src, dst, label_repeat, rationale_repeat)
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(s.skipped.items())) or "none"
    click.echo(f"{dst}: {s.read} records read, {s.written} task records written; skipped: {skipped}")


@main.command("import-api")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--tokenizer", required=True, type=click.Path(file_okay=False),
              help="Directory of the tokenizer that matches the API's tokens (needs a chat_template).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache directory to write.")
@click.option("--max-unmapped", default=0.01, show_default=True,
              help="Refuse when more than this share of tokens is not in the tokenizer's vocabulary.")
@click.option("--teacher", default="api", show_default=True, help="Model name recorded in the manifest.")
@click.option("--overwrite", is_flag=True, help="Replace whatever --out holds.")
def import_api_command(file, tokenizer, out, max_unmapped, teacher, overwrite):
    """Build a cache from OpenAI-compatible chat completions with logprobs (JSONL: the request's messages and
    the response with choices[0].logprobs.content[].top_logprobs): top-k targets on the answer tokens.

    \b
    Example:
      teachercache import-api answers.jsonl --tokenizer Qwen2.5-7B-Instruct/ --out /tmp/api-cache
    """
    from .import_api import ApiImportOptions, import_api

    _, report = import_api(file, tokenizer, out, ApiImportOptions(max_unmapped=max_unmapped, teacher=teacher,
                                                                   overwrite=overwrite))
    for line in report.lines():
        click.echo(f"{out}: {line}" if not line.startswith(" ") else line)


def _add_student_commands() -> None:
    """`train`, `eval` and `demo` come from the student package (which imports teachercache; the library
    modules of teachercache never import student)."""
    from student.cli import demo_command, eval_command, train_command

    main.add_command(train_command)
    main.add_command(eval_command)
    main.add_command(demo_command)


_add_student_commands()
