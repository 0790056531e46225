"""`teachercache build ... --estimate`: what the whole build will cost, from the real pass over a sample.

The teacher pass runs exactly as the build's would (same teacher, device, dtype, batch size, targets, hidden
layers, shard encoding) over the first ``EstimateOptions.rows`` rows of --data, and writes its shards into a
temporary directory that is deleted afterwards: --out is neither created nor touched. From the sample:

    bytes/token  = the sample's shard bytes / its tokens (Arrow framing and schema included)
    tokens/s     = the sample's tokens / the time from its first batch to its last shard closed; a warm-up
                   pass over one batch goes first, so that first-call costs (kernels, numba, the allocator)
                   are not counted

and for the whole input, its tokens: counted by reading every document, tokenizing it with the teacher's
tokenizer and packing it into rows as the build does (no teacher; a fast tokenizer does a few MB of text a
second per core), or given with ``--estimate-tokens N`` for a stream or a corpus too large to read twice.
The projection is bytes/token x tokens for the shards (tokenizer/ and the manifest add some kB), and
tokens / (tokens/s) for the teacher pass of one process on this machine, plus the teacher's load.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from teachercache.errors import check_number
from teachercache.format.slices import Slice
from teachercache.runtime import resolve_device, resolve_dtype
from teachercache.teacher.build import BuildError, BuildOptions, sample_pass
from teachercache.teacher.corpus import DocumentCounts, iter_packed_rows


@dataclass(frozen=True)
class EstimateOptions:
    """What `build --estimate` samples and projects to."""

    rows: int = 256
    """Rows of --data (the first ones) the sample pass of --estimate runs over."""
    tokens: int | None = None
    """Tokens of the whole input for --estimate's projection, when known (a stream, a corpus too large to read
    twice). None: count them by tokenizing all of --data."""

    def __post_init__(self):
        check_number("build", "estimate rows (--estimate-rows)", self.rows, low=1, integer=True)
        if self.tokens is not None:
            check_number("build", "estimate tokens (--estimate-tokens)", self.tokens, low=1, integer=True)


@dataclass(frozen=True)
class Estimate:
    """The sample pass's measurements and the projection for the whole input."""

    sample_rows: int
    sample_tokens: int
    sample_bytes: int
    """Bytes of the sample's shards."""
    seconds: float
    """The sample's teacher pass, from its first batch to its last shard closed (after a warm-up batch)."""
    load_seconds: float
    """Loading the teacher and its tokenizer."""
    total_tokens: int
    total_rows: int | None
    """Rows of the whole input when counted; None when --estimate-tokens gave the tokens."""
    count_seconds: float
    """Counting the whole input's tokens (0 when given)."""
    device: str
    slices: int | None = None
    """n of --slice i/n: each slice's share is about 1/n of the whole."""

    @property
    def bytes_per_token(self) -> float:
        return self.sample_bytes / self.sample_tokens

    @property
    def tokens_per_second(self) -> float:
        return self.sample_tokens / max(self.seconds, 1e-9)

    @property
    def projected_bytes(self) -> int:
        return round(self.bytes_per_token * self.total_tokens)

    @property
    def projected_seconds(self) -> float:
        """The teacher pass over the whole input, one process on this machine (the load not included)."""
        return self.total_tokens / self.tokens_per_second

    def lines(self) -> list[str]:
        """The report `build --estimate` prints."""
        counted = (f"counted: {self.total_rows:,} rows, every document tokenized and packed, {self.count_seconds:.1f} s"
                   if self.total_rows is not None else "given by --estimate-tokens")
        out = [f"estimate: the teacher pass over the first {self.sample_rows:,} rows of --data ({self.sample_tokens:,} "
               f"tokens) on {self.device}; nothing was written to --out",
               f"  bytes/token             {self.bytes_per_token:.2f}",
               f"  tokens/s                {self.tokens_per_second:,.0f} (the sample's pass, after a warm-up batch)",
               f"  whole input             {self.total_tokens:,} tokens ({counted})",
               f"  projected size          {self.projected_bytes:,} bytes ({_size(self.projected_bytes)}) of shards",
               f"  projected time          {_duration(self.projected_seconds)} of teacher pass in one process, plus "
               f"{self.load_seconds:.0f} s to load the teacher"]
        if self.total_rows is not None and self.total_rows <= self.sample_rows:
            out.append("  (the sample was the whole input)")
        if self.slices:
            n = self.slices
            out.append(f"  per slice of {n}        about {_size(self.projected_bytes / n)} and "
                       f"{_duration(self.projected_seconds / n)} each")
        return out


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return ""


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds:.1f} s ({seconds / 3600:.4f} h)"


def estimate_build(options: BuildOptions, estimate: EstimateOptions = EstimateOptions()) -> Estimate:
    """Run the sample pass of ``options``' build and project its cost (module docstring). Writes nothing but
    the sample's shards, in a temporary directory removed before it returns."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or options.tp_size > 1:
        raise BuildError("--estimate measures one process: run it without torchrun (and without --tp-size); the "
                         "projected hours then divide by about the number of ranks")
    with tempfile.TemporaryDirectory(prefix="teachercache-estimate-") as tmp:
        sample = sample_pass(dataclasses.replace(options, out=str(Path(tmp) / "sample"), resume=False,
                                                 overwrite=False), estimate.rows)
    if sample.rows == 0:
        raise BuildError(f"{', '.join(options.data.paths)}: the corpus gave no rows; nothing to estimate")
    sample_tokens = sum(s.tokens for s in sample.shards)
    sample_bytes = sum(s.bytes for s in sample.shards)
    total_rows, count_seconds = None, 0.0
    total_tokens = estimate.tokens
    if total_tokens is None:
        start, total_rows, total_tokens = time.time(), 0, 0
        for row in iter_packed_rows(options.data, sample.tokenizer, DocumentCounts()):
            total_rows += 1
            total_tokens += len(row.input_ids)
        count_seconds = time.time() - start
    device = resolve_device(options.device)
    slices = Slice.parse(options.slice).count if options.slice is not None else None
    return Estimate(sample_rows=sample.rows, sample_tokens=sample_tokens, sample_bytes=sample_bytes,
                    seconds=sample.seconds, load_seconds=sample.load_seconds,
                    total_tokens=total_tokens,
                    total_rows=total_rows, count_seconds=count_seconds,
                    device=f"{device.type}, {str(resolve_dtype(options.dtype, device)).replace('torch.', '')}",
                    slices=slices)
