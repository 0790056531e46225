"""Commands that make or read a cache: build, inspect, verify, show, plot, diff, export, import-vllm,
import-api. Each maps its flags onto one library call (defaults and help from the options dataclasses)."""

from __future__ import annotations

import json

import click

from teachercache.cli.config import ConfigCommand, config_option, save_config
from teachercache.cli.options import (FiniteFloatRange, dtype_option, field_docs, field_option, overwrite_option,
                                      runtime_options, split_groups)
from teachercache.errors import OptionError
from teachercache.format.merge import MergeOptions
from teachercache.format.schema import HIDDEN_DTYPES, TARGET_KINDS
from teachercache.format.slices import Slice
from teachercache.inspect.diff import DiffOptions
from teachercache.interop.export import FORMATS, ExportOptions
from teachercache.interop.openai_chat import ApiImportOptions
from teachercache.interop.vllm import VllmImportOptions
from teachercache.teacher.build import DEVICE_MAPS, BuildOptions
from teachercache.teacher.corpus import BAD_RECORDS_HELP, PACKINGS, DataError, DataOptions, bad_record_limit
from teachercache.teacher.estimate import EstimateOptions
from teachercache.teacher.targets import MAX_IDS, TEMPERATURES, TargetOptions


def _layers(ctx, param, value):
    try:
        layers = tuple(int(x) for x in value.split(",") if x.strip()) if value else ()
    except ValueError:
        raise click.BadParameter(f"{value!r}: give layer indices separated by commas, e.g. 3,6") from None
    if any(x < 0 for x in layers):
        raise click.BadParameter(f"{value!r}: hidden-state indices are >= 0 (0 = embeddings)")
    if twice := sorted({x for x in layers if layers.count(x) > 1}):
        raise click.BadParameter(f"{value!r}: layer {twice[0]} is given twice; name each layer once")
    return layers


def _slice(ctx, param, value):
    if value is not None:
        try:
            Slice.parse(value)
        except OptionError as e:
            raise click.BadParameter(str(e).split(": ", 1)[1]) from None
    return value


def _bad_records(ctx, param, value):
    try:
        bad_record_limit(value)
    except DataError:
        raise click.BadParameter(f"{value!r}: {BAD_RECORDS_HELP}") from None
    return value


@click.command("build", cls=ConfigCommand)
@config_option("data, targets")
@field_option(BuildOptions, "teacher", "--teacher", required=True)
@click.option("--data", "data__paths", required=True, multiple=True,
              help="Input: .jsonl/.json/.parquet/.txt/.arrow file (.jsonl/.json/.txt also as .gz or .zst) or a "
                   "directory of them (repeatable; other files there are listed as ignored).")
@field_option(BuildOptions, "out", "--out", required=True, type=click.Path(file_okay=False))
@field_option(DataOptions, "seq_len", "--seq-len", dest="data__seq_len", type=click.IntRange(min=2))
@field_option(DataOptions, "packing", "--packing", dest="data__packing", type=click.Choice(PACKINGS))
@field_option(BuildOptions, "batch_size", "--batch-size", type=click.IntRange(min=1))
@dtype_option(BuildOptions)
@field_option(TargetOptions, "kind", "--target", dest="targets__kind", type=click.Choice(TARGET_KINDS))
@field_option(TargetOptions, "k", "--k", dest="targets__k", type=click.IntRange(1, MAX_IDS))
@field_option(TargetOptions, "top_p", "--top-p", dest="targets__top_p", type=FiniteFloatRange(0, 1, min_open=True))
@field_option(TargetOptions, "min_k", "--min-k", dest="targets__min_k", type=click.IntRange(1, MAX_IDS))
@field_option(TargetOptions, "max_k", "--max-k", dest="targets__max_k", type=click.IntRange(1, MAX_IDS))
@field_option(TargetOptions, "samples", "--samples", dest="targets__samples", type=click.IntRange(1, MAX_IDS))
@field_option(TargetOptions, "seed", "--seed", dest="targets__seed", type=click.IntRange(0, 2**63 - 1))
@field_option(TargetOptions, "temperature", "--temperature", dest="targets__temperature",
              type=FiniteFloatRange(*TEMPERATURES))
@click.option("--hidden-layers", "hidden_layers", callback=_layers, default="",
              help=field_docs(BuildOptions)["hidden_layers"] + " E.g. 3,6.")
@field_option(BuildOptions, "hidden_dtype", "--hidden-dtype", type=click.Choice(HIDDEN_DTYPES))
@field_option(DataOptions, "text_field", "--text-field", dest="data__text_field")
@field_option(DataOptions, "max_docs", "--max-docs", dest="data__max_docs", type=click.IntRange(min=1))
@field_option(DataOptions, "max_bad_records", "--max-bad-records", dest="data__max_bad_records", callback=_bad_records)
@click.option("--shard-mb", "shard_mb", type=FiniteFloatRange(min=0, max=1 << 20, min_open=True),
              default=BuildOptions.shard_bytes / (1 << 20), show_default=True,
              help="Close a shard at this many MB (fractions allowed, e.g. 0.05; at most 1048576).")
@field_option(BuildOptions, "zstd_level", "--zstd-level", type=click.IntRange(1, 22))
@field_option(BuildOptions, "head_chunk", "--head-chunk", type=click.IntRange(min=0))
@field_option(BuildOptions, "device_map", "--device-map", type=click.Choice(DEVICE_MAPS))
@field_option(BuildOptions, "max_memory", "--max-memory")
@field_option(BuildOptions, "tp_size", "--tp-size", type=click.IntRange(min=1))
@field_option(BuildOptions, "slice", "--slice", callback=_slice)
@field_option(BuildOptions, "resume", "--resume")
@overwrite_option(BuildOptions)
@click.option("--estimate", is_flag=True, help="Write nothing: run the teacher pass over the first --estimate-rows "
              "rows (shards in a temporary directory), then print bytes/token, tokens/s and the projected size and "
              "hours of the whole build.")
@field_option(EstimateOptions, "rows", "--estimate-rows", dest="estimate_rows", type=click.IntRange(min=1))
@field_option(EstimateOptions, "tokens", "--estimate-tokens", dest="estimate_tokens", type=click.IntRange(min=1))
@runtime_options(BuildOptions, "teacher")
def build_command(shard_mb, estimate, estimate_rows, estimate_tokens, **values):
    """Run the teacher once over --data and write the cache to --out.

    \b
    Example:
      teachercache build --teacher data/teacher --data data/corpus/valid.parquet --out /tmp/demo-cache --seq-len 256
      teachercache build --config /tmp/demo-cache/config.yaml --out /tmp/demo-cache-2   # the same build again
      teachercache build --teacher data/teacher --data data/corpus/train.parquet --out /tmp/c --estimate
    """
    from teachercache.teacher.build import build_cache

    top, groups = split_groups(values)
    data = DataOptions(**{**groups["data"], "paths": tuple(groups["data"]["paths"])})
    options = BuildOptions(**top, data=data, targets=TargetOptions(**groups["targets"]).spec(),
                           shard_bytes=max(1, int(shard_mb * (1 << 20))))
    sample = EstimateOptions(rows=estimate_rows, tokens=estimate_tokens)
    if estimate:
        from teachercache.teacher.estimate import estimate_build

        for line in estimate_build(options, sample).lines():
            click.echo(line)
        return
    if sample != EstimateOptions():
        raise click.UsageError("--estimate-rows and --estimate-tokens shape --estimate's projection: add --estimate")
    result = build_cache(options)
    save_config(options.out)   # beside the complete cache: --config of it builds the same cache again
    if result.rows:
        click.echo(f"{options.out}: {result.rows:,} rows, {result.tokens:,} tokens, "
                   f"{result.bytes / result.tokens:.1f} bytes/token, {result.seconds:.1f} s "
                   f"({result.tokens / result.seconds:,.0f} tokens/s)")
    if result.bad_records or result.ignored_files:
        click.echo(f"{options.out}: {result.bad_records:,} bad records skipped, {result.ignored_files:,} files in "
                   f"--data ignored; each is listed in {options.out}/skipped.jsonl", err=True)


@click.command("inspect")
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
    from teachercache.inspect.report import format_report, inspect_cache

    report = inspect_cache(cache, sample_batches=sample_batches)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@click.command("verify")
@click.argument("cache", type=click.Path(file_okay=False))
@click.option("--deep", is_flag=True, help="Also decode every row and check its values (ids, masses, counts).")
def verify_command(cache, deep):
    """Check CACHE: manifest, version, checksums, schemas, counts; with --deep every row's values too,
    each fault named by shard, row and position. Exits 1 on any fault.

    \b
    Example:
      teachercache verify /tmp/demo-cache --deep
    """
    from teachercache.inspect.verify import verify_cache

    faults = verify_cache(cache, deep=deep)
    for fault in faults:
        click.echo(f"FAULT {fault}", err=True)
    if faults:
        raise SystemExit(1)
    click.echo(f"{cache}: OK")


@click.command("show")
@click.argument("cache", type=click.Path(file_okay=False))
@click.option("--row", type=click.IntRange(min=0), required=True, help="Row number in the cache (0-based).")
@click.option("--positions", default=None, help="Token range a:b of the row to list (default: all).")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True, help="Teacher alternatives per position.")
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

    from teachercache.inspect.show import format_html, format_text, parse_positions, show_row

    view = show_row(cache, row, parse_positions(positions), top)
    click.echo(format_text(view, colour=sys.stdout.isatty()))
    if html_file:
        with open(html_file, "w", encoding="utf-8") as f:
            f.write(format_html(view))


@click.command("plot")
@click.argument("cache", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the PNG files.")
def plot_command(cache, out):
    """Draw the distributions of `inspect` (captured mass, entropy, ids per position, rank of the next
    token, shards) as PNG figures in --out.

    \b
    Example:
      teachercache plot /tmp/demo-cache --out /tmp/demo-plots
    """
    from teachercache.inspect.plot import plot_cache

    for path in plot_cache(cache, out):
        click.echo(str(path))


@click.command("diff")
@click.argument("cache_a", type=click.Path(file_okay=False))
@click.argument("cache_b", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@field_option(DiffOptions, "worst", "--worst", type=click.IntRange(min=0))
def diff_command(cache_a, cache_b, as_json, worst):
    """KL(A||B) per position between two caches of the same rows: mean, p50, p99, max and the worst rows.

    \b
    Example:
      teachercache diff /tmp/cache-k64 /tmp/cache-k8 --json
    """
    from teachercache.inspect.diff import diff_caches, format_diff

    report = diff_caches(cache_a, cache_b, DiffOptions(worst=worst))
    click.echo(json.dumps(report, indent=2) if as_json else format_diff(report))


@click.command("export")
@click.argument("cache", type=click.Path(file_okay=False))
@field_option(ExportOptions, "format", "--format", type=click.Choice(FORMATS))
@click.option("--out", required=True, type=click.Path(), help="Output file (axolotl) or directory (hf).")
@field_option(ExportOptions, "renormalize", "--renormalize/--no-renormalize")
@field_option(ExportOptions, "temperature", "--temperature", type=FiniteFloatRange(*TEMPERATURES))
@overwrite_option(ExportOptions)
def export_command(cache, out, **options):
    """Write CACHE as a dataset other trainers read (Axolotl's KD plugin, Hugging Face datasets). An axolotl
    export prints (on stderr) the kd_temperature to set in Axolotl, and whether kd_normalize_topk must be false.

    \b
    Example:
      teachercache export /tmp/demo-cache --format axolotl --out /tmp/demo-kd.parquet
    """
    import warnings

    from teachercache.interop.export import ExportWarning, export_cache, export_notes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)  # printed below, as the file itself records it
        rows = export_cache(cache, out, ExportOptions(**options))
    click.echo(f"{out}: {rows:,} rows")
    for note in export_notes(out):
        click.echo(f"{out}: {note}", err=True)


@click.command("import-vllm")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--tokenizer", required=True, type=click.Path(file_okay=False),
              help="Directory of the teacher's tokenizer (copied into the cache).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache directory to write.")
@field_option(VllmImportOptions, "k", "--k", type=click.IntRange(min=1))
@field_option(VllmImportOptions, "teacher", "--teacher")
@overwrite_option(VllmImportOptions)
def import_vllm_command(file, tokenizer, out, **options):
    """Build a cache from vLLM prompt_logprobs. FILE is JSON Lines, one JSON array of records, or one JSON
    object; each record is a vLLM completions response (choices[i].prompt_logprobs), chat completions
    response (top-level prompt_logprobs), LLM.generate RequestOutput written as a dict, or
    {"prompt_token_ids": [...], "prompt_logprobs": [...]}. Request prompt_logprobs=k and return_token_ids:
    true (without token ids the record's "prompt" text, or a chat response's "prompt_text", is tokenized
    with --tokenizer and must match).
    Choices of one response with the same prompt are stored once. docs/interop.md shows each shape.

    \b
    Example:
      teachercache import-vllm responses.jsonl --tokenizer Qwen2.5-7B/ --out /tmp/vllm-cache --k 20
    """
    from teachercache.interop.vllm import REPEATS_KEY, import_vllm

    manifest = import_vllm(file, tokenizer, out, VllmImportOptions(**options))
    click.echo(f"{out}: {manifest.totals.rows:,} rows, {manifest.totals.target_positions:,} target positions")
    if manifest.extra[REPEATS_KEY]:
        click.echo(f"{out}: {manifest.extra[REPEATS_KEY]:,} choices repeated an earlier choice's prompt "
                   "(n > 1) and were stored once")


@click.command("import-api")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--tokenizer", required=True, type=click.Path(file_okay=False),
              help="Directory of the tokenizer that matches the API's tokens (needs a chat_template).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache directory to write.")
@click.option("--requests", type=click.Path(dir_okay=False), default=None,
              help="The OpenAI Batch input file (custom_id, method, url, body) when FILE is that batch's output "
                   "file: each answer gets the messages of the request with its custom_id.")
@field_option(ApiImportOptions, "max_unmapped", "--max-unmapped", type=FiniteFloatRange(0, 1))
@field_option(ApiImportOptions, "strict", "--strict")
@field_option(ApiImportOptions, "teacher", "--teacher")
@overwrite_option(ApiImportOptions)
def import_api_command(file, tokenizer, out, requests, **options):
    """Build a cache from OpenAI-compatible chat completions with logprobs: top-k targets on the answer tokens.
    FILE is JSON Lines, one request a line: {"messages": [...], "response": <chat.completion>} (requested with
    logprobs: true, top_logprobs: 20), or an OpenAI Batch output file with its input file as --requests.
    Failed requests, refusals, tool calls, empty or content-filtered answers are skipped and counted (--strict
    refuses them). docs/blackbox.md shows each shape.

    \b
    Example:
      teachercache import-api answers.jsonl --tokenizer Qwen2.5-7B-Instruct/ --out /tmp/api-cache
      teachercache import-api batch_output.jsonl --requests batch_input.jsonl \\
          --tokenizer Qwen2.5-7B-Instruct/ --out /tmp/api-cache --strict
    """
    from teachercache.interop.openai_chat import import_api

    _, report = import_api(file, tokenizer, out, ApiImportOptions(**options), requests=requests)
    for line in report.lines():
        click.echo(f"{out}: {line}" if not line.startswith(" ") else line)


@click.command("merge")
@click.argument("parts", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="The merged cache directory or URL to write (new or empty).")
@field_option(MergeOptions, "copy", "--copy")
def merge_command(parts, out, copy):
    """Join the caches of `build --slice i/n` jobs (PART... = slices 0..n-1, each once, any order) into one cache
    at --out. The parts must agree on teacher, tokenizer, targets, seq-len, corpus and format; each refusal names
    the part and the field. The manifest references the parts' shards (same filesystem; keep the parts) unless
    --copy copies them in. At URLs (s3://...) references stay within one bucket; --copy streams each shard
    through this machine with its SHA-256 checked. docs/scale.md has SLURM and Kubernetes scripts.

    \b
    Example:
      teachercache merge /scratch/c-0 /scratch/c-1 /scratch/c-2 --out /scratch/cache
      teachercache merge /scratch/c-* --out /data/cache --copy
      teachercache merge s3://bucket/c-0 s3://bucket/c-1 --out s3://bucket/cache
    """
    from teachercache.format.merge import merge_caches

    manifest = merge_caches(parts, out, MergeOptions(copy=copy))
    how = "copied into it" if copy else "referenced where they lie"
    click.echo(f"{out}: {manifest.totals.rows:,} rows, {manifest.totals.tokens:,} tokens from {len(parts)} slices "
               f"({len(manifest.shards)} shards, {how})")


COMMANDS = (build_command, merge_command, inspect_command, verify_command, show_command, plot_command, diff_command,
            export_command, import_vllm_command, import_api_command)
