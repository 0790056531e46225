"""The teacher pass: corpus in, cache out (`teachercache build`).

    rows (teacher.corpus) -> batches -> teacher forward (no_grad) -> targets (teacher.targets) -> RowBatch
    -> bounded queue -> writer thread: encode + write shards (format.cache.CacheWriter) -> manifest.json

The writer thread runs beside the forward pass, so the device never waits on encoding or disk while the
queue has room (``queue_batches`` bounds memory); one forward batch becomes one Arrow record batch.
``--resume`` goes on after the last shard each rank closed and gives the same cache as a build that never
stopped: the options that decide the cache's content are recorded in its marker (format.outputs) when the
build claims the directory, and a resumed build with any of them changed is refused. Bad input records are
skipped and listed in skipped.jsonl. Under torchrun, rank r of w takes rows i with i mod w = r and rank 0
writes the one manifest; ``--slice i/n`` builds only the rows g with g mod n = i (format.slices), shared out
over the ranks the same way, for `teachercache merge` to join (docs/scale.md); ``sample_pass`` is the
sample of --estimate (teacher.estimate). docs/build.md ("How the teacher pass works") has the details:
targets computed in the writer thread for a CPU teacher, the resume state, the ranks.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import queue
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from teachercache.errors import TeachercacheError, check_number
from teachercache.format import schema as S
from teachercache.format.batch import RowBatch
from teachercache.format.cache import DEFAULT_SHARD_BYTES, CacheWriter
from teachercache.format.manifest import (MANIFEST_NAME, SHARDS_DIR, STATE_DIR, TOKENIZER_DIR, DataInfo, TargetSpec,
                                          TeacherInfo, TokenizerInfo, config_fingerprint, tokenizer_fingerprint,
                                          write_json_atomic)
from teachercache.format.outputs import MARKER, check_output, identify, options_record, write_marker
from teachercache.format.shards import ZSTD_LEVEL, ShardInfo, file_sha256
from teachercache.format.storage import is_url
from teachercache.format.slices import EXTRA_KEY as SLICE_KEY
from teachercache.format.slices import Slice
from teachercache.runtime import load_causal_lm, pad_id, rank_and_world, resolve_device, resolve_dtype
from teachercache.teacher.corpus import (BadRecord, DataOptions, DocumentCounts, TooManyBadRecords, count_documents,
                                         data_fingerprint, iter_packed_rows, scan_inputs)
from teachercache.teacher.head import SplitHead, split_head
from teachercache.teacher.remote_build import build_remote, staged
from teachercache.teacher.targets import (check_spec, compute_targets, join_targets, position_targets,
                                         position_uniforms)

SKIPPED_NAME = "skipped.jsonl"
"""Beside the manifest: every bad record (file, line, reason) and every ignored input file of the last pass."""
SHOW_BAD = 10
"""Bad records (and ignored files) printed to stderr; the rest are in skipped.jsonl only."""
SAFE = frozenset({"out", "resume", "overwrite", "progress", "queue_batches", "data.max_bad_records"})
"""The options a resumed build may change: none of them changes a byte of the cache (docs/build.md, "What
--resume may change"). Every other option, and the device type, dtype, world size and input files they
resolve to, is recorded in the marker and must be the same."""


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
"""accelerate's placement strategies that --device-map takes."""
OFFLOAD_DIR = "offload"
"""Under state/: the layers a --device-map build reads from disk."""


class BuildError(TeachercacheError):
    """A build that cannot start or go on as asked."""


def parse_max_memory(text: str) -> dict:
    """--max-memory "0=70GiB,cpu=200GiB" -> {0: "70GiB", "cpu": "200GiB"} (accelerate's max_memory)."""
    out = {}
    for part in text.split(","):
        key, sep, size = part.strip().partition("=")
        key, size = key.strip(), size.strip()
        if not sep or not size or not (key.isdigit() or key in ("cpu", "mps")):
            raise BuildError(f"--max-memory {text!r}: give DEVICE=SIZE pairs separated by commas, DEVICE a GPU "
                             "index or cpu, e.g. 0=70GiB,1=70GiB,cpu=200GiB")
        out[int(key) if key.isdigit() else key] = size
    return out


@dataclass(frozen=True)
class BuildOptions:
    """Everything `teachercache build` needs; the CLI maps its flags onto this and nothing else."""

    teacher: str
    """Hub id or local directory of the teacher."""
    data: DataOptions
    """The input documents and how they become rows."""
    out: str
    """The cache directory to write."""
    targets: TargetSpec = field(default_factory=TargetSpec)
    """What to store per position (kind, k, top_p, samples, ...)."""
    batch_size: int = 8
    """Rows per forward pass (and per Arrow record batch)."""
    dtype: str = "auto"
    """Teacher dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32."""
    device: str = "auto"
    """auto (cuda if available), cuda, cpu."""
    device_map: str | None = None
    """Spread a teacher too large for one device over the visible GPUs, then CPU memory, then disk, in one
    process (accelerate's placement: auto, balanced, balanced_low_0, sequential). None: all of it on --device."""
    max_memory: str | None = None
    """With --device-map: memory each device may hold, e.g. "0=70GiB,1=70GiB,cpu=200GiB"; layers that do not
    fit are read from disk as they run (out/state/offload, removed after the pass)."""
    tp_size: int = 1
    """Under torchrun: ranks that hold one teacher together by tensor parallelism (transformers' plan for the
    family) and run the same rows; the world's ranks form world / tp_size such groups, which share out the
    rows. 1: every rank holds a whole teacher."""
    slice: str | None = None
    """i/n: write only slice i of n (the rows g with g mod n = i of the one-job build), as a complete cache of
    its own; `teachercache merge` joins the n slices' caches into one (docs/scale.md). None: every row."""
    hidden_layers: tuple[int, ...] = ()
    """Hidden-state layers to store (0 = embeddings output, L = last layer), at target positions."""
    hidden_dtype: str = "bfloat16"
    """bfloat16 or float16."""
    shard_bytes: int = DEFAULT_SHARD_BYTES
    """A shard is closed once it holds this many bytes."""
    zstd_level: int = ZSTD_LEVEL
    """Arrow IPC zstd level of the shards (19: ~4% smaller, ~20x slower to write)."""
    resume: bool = False
    """Continue an interrupted build in --out; refused if an option that decides the cache's content changed."""
    overwrite: bool = False
    """Replace the cache in --out (only its own files are deleted; a directory that is not a cache is refused)."""
    trust_remote_code: bool = False
    """Let transformers run the teacher repository's own code (off unless asked for)."""
    queue_batches: int = 4
    """Batches waiting for the writer at most (bounds memory); 1 when the writer computes the targets."""
    head_chunk: int = 1024
    """Target positions whose logits exist at once: the LM head runs over chunks of this many positions
    (extra memory ~ head_chunk x vocabulary floats). 0: the model's whole forward, all the batch's logits at
    once (the fallback of a model whose head cannot be split; teacher.head)."""
    targets_backend: str = "auto"
    """compute_targets' backend: auto (numba for top-k/nucleus of a CPU teacher, else torch), torch, numba."""
    progress: bool = True
    """Show a tqdm bar."""

    def __post_init__(self):
        """Refuse (OptionError, BuildError) a value no build can use: numbers finite and in range, hidden
        layers distinct and >= 0, targets that can work, not --resume and --overwrite at once."""
        for name, flag, high in (("batch_size", "--batch-size", None), ("shard_bytes", "--shard-mb", None),
                                 ("zstd_level", "--zstd-level", 22), ("queue_batches", None, None)):
            check_number("build", f"{name} ({flag})" if flag else name, getattr(self, name), low=1, high=high,
                         integer=True)
        check_number("build", "head_chunk (--head-chunk)", self.head_chunk, low=0, integer=True)
        check_number("build", "tp_size (--tp-size)", self.tp_size, low=1, integer=True)
        if self.slice is not None:
            Slice.parse(self.slice)
        if self.tp_size > 1 and self.device_map is not None:
            raise BuildError("--tp-size and --device-map together: tensor parallelism places the teacher over "
                             "the ranks of torchrun, --device-map over one process's devices; give one")
        layers = tuple(self.hidden_layers)
        shown = ",".join(map(str, layers))
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers):
            raise BuildError(f"--hidden-layers {shown}: give hidden-state indices >= 0 (0 = embeddings)")
        if twice := sorted({x for x in layers if layers.count(x) > 1}):
            raise BuildError(f"--hidden-layers {shown}: layer {twice[0]} is given twice; name each layer once")
        if isinstance(self.targets, TargetSpec):
            check_spec(self.targets, None)
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise BuildError(f"--device-map {self.device_map!r}: choose one of {', '.join(DEVICE_MAPS)}")
        if self.max_memory is not None:
            if self.device_map is None:
                raise BuildError("--max-memory places layers of --device-map: give --device-map auto as well")
            parse_max_memory(self.max_memory)
        if self.resume and self.overwrite:
            raise BuildError("--resume and --overwrite together: --resume continues the build in --out, "
                             "--overwrite replaces it; give one")


@dataclass
class BuildResult:
    manifest_path: Path
    rows: int
    tokens: int
    bytes: int
    seconds: float
    """Wall time of the whole build."""
    load_seconds: float = 0.0
    """Of which: loading the teacher and tokenizer."""
    bad_records: int = 0
    """Input records skipped as unusable (listed in skipped.jsonl)."""
    ignored_files: int = 0
    """Files in --data directories that were not read (listed in skipped.jsonl)."""


def load_teacher(options: BuildOptions, device, dtype, world: int = 1):
    """(tokenizer, model in eval mode): on ``device``, or placed by --device-map (layers that fit nowhere are
    offloaded to out/state/offload), or split over each group of --tp-size ranks (of ``world``)."""
    path = Path(options.teacher)
    if (path.is_absolute() or options.teacher.startswith(".")) and not path.exists():
        raise BuildError(f"--teacher {options.teacher}: no such directory")
    if options.tp_size > 1:
        from transformers.distributed.configuration_utils import DistributedConfig

        groups = world // options.tp_size   # data-parallel replicas of the tensor-parallel teacher
        config = DistributedConfig(tp_size=options.tp_size, **({"dp_replicate_size": groups} if groups > 1 else {}))
        tokenizer, model = load_causal_lm(options.teacher, dtype, options.trust_remote_code, BuildError,
                                          distributed_config=config)
        return tokenizer, model.eval()
    if options.device_map is None:
        tokenizer, model = load_causal_lm(options.teacher, dtype, options.trust_remote_code, BuildError)
        return tokenizer, model.to(device).eval()
    placement = dict(device_map=options.device_map, offload_folder=str(Path(options.out) / STATE_DIR / OFFLOAD_DIR))
    if options.max_memory is not None:
        placement["max_memory"] = parse_max_memory(options.max_memory)
    tokenizer, model = load_causal_lm(options.teacher, dtype, options.trust_remote_code, BuildError, **placement)
    return tokenizer, model.eval()


def _check_model(options: BuildOptions, model, vocab_size: int) -> None:
    cfg = model.config
    n_layers = getattr(cfg, "num_hidden_layers", None)
    for layer in options.hidden_layers:
        if n_layers is None or not 0 <= layer <= n_layers:
            raise BuildError(f"--hidden-layers {layer}: the teacher has hidden states 0..{n_layers} "
                             "(0 = embeddings, the last = final layer)")
    max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if max_pos is not None and options.data.seq_len > max_pos:
        raise BuildError(f"--seq-len {options.data.seq_len} exceeds the teacher's "
                         f"max_position_embeddings {max_pos}; use --seq-len {max_pos} or less")
    out_size = model.get_output_embeddings().weight.shape[0]
    if out_size < vocab_size:
        raise BuildError(f"the teacher's output has {out_size} columns but its tokenizer {vocab_size} "
                         "tokens: they do not belong together")
    try:
        check_spec(options.targets, vocab_size)
    except ValueError as e:
        raise BuildError(str(e)) from None


# ---------------------------------------------------------------------------------------------------
# The cache directory: refuse, clear or resume; lock against a second build.


def content_record(options: BuildOptions, device, dtype, world: int) -> dict:
    """The options that decide the cache's content, as its marker records them: every option but SAFE ones,
    the device type, dtype and world size they resolve to, and the fingerprint of the input files (names,
    sizes, modification times)."""
    values = {**asdict(options), "device": device.type, "dtype": str(dtype).replace("torch.", ""),
              "world_size": world, "data": {**asdict(options.data), "fingerprint": data_fingerprint(options.data)[:16]}}
    if options.slice is None:
        del values["slice"]  # the record of a whole build stays what it was before --slice existed
    return options_record(values, safe=SAFE)


def _check_paths(options: BuildOptions) -> None:
    """Refuse an --out inside a --data directory (the pass would read the cache's own files as documents)
    and a --data path inside --out (--overwrite would delete it)."""
    out = Path(options.out).resolve()
    for given in options.data.paths:
        data = Path(given).resolve()
        if Path(given).is_dir() and (out == data or data in out.parents):
            raise BuildError(f"--out {options.out} lies inside --data {given}: the pass would read the cache's "
                             "own files (tokenizer.json, shards) as documents; choose an --out outside the data")
        if out == data or out in data.parents:
            raise BuildError(f"--data {given} lies inside --out {options.out}: replacing or resuming the cache "
                             "could delete it; move the data or choose another --out")


def _publish(out: Path, relative: str) -> None:
    """A build into a URL stages its files in a local directory (teacher.remote_build): copy ``relative``, just
    written (or deleted) there, to the URL. Nothing for a local --out."""
    if (remote := staged(out)) is not None:
        remote.publish(relative)


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def _decide(options: BuildOptions, record: dict, *, early: bool) -> str:
    """What the build does with --out: ``new``, ``resume`` or ``overwrite`` (delete the cache's own entries
    first); BuildError or OutputError (format.outputs.check_output) for everything else. Rank 0 decides
    before the teacher is loaded (``early``) and again, for good, once it holds its lock.

    Beyond check_output's rule: --resume where nothing was written yet starts the build (it was stopped
    before it began), and a cache in which no shard was ever closed (a build that failed or was killed
    early) is replaced without --overwrite: it holds nothing to lose."""
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise BuildError(f"{out}: exists and is not a directory (--out)")
    if _holds_nothing(out):
        if options.resume and early:
            _note(f"{out}: nothing to resume yet (the build stopped before it wrote anything); starting it")
        return "new"
    kind, marker = identify(out)
    if kind == "cache":
        if (out / MANIFEST_NAME).exists():
            if options.resume:
                raise BuildError(f"{out}: the build is already complete (manifest.json exists)")
        elif not options.resume and not _closed_shards(out):
            if early:
                _note(f"{out}: the build there stopped before its first shard; replacing it")
            return "overwrite"
        if not (options.resume or options.overwrite):
            raise BuildError(f"{out}: not empty; add --resume to continue a build there or --overwrite "
                             "to replace it")
        if options.resume and marker is None and early:
            _note(f"{out}: written before caches recorded their options, so they cannot be compared: "
                  "resuming with the options given")
    return check_output(out, "cache", record=record, resume=options.resume, overwrite=options.overwrite)


def _holds_nothing(out: Path) -> bool:
    """Missing, empty, or holding only a state/ directory of lock files (a build stopped as it started)."""
    if not out.exists():
        return True
    entries = list(out.iterdir())
    return all(p.name == STATE_DIR and p.is_dir() and all(q.suffix == ".lock" for q in p.iterdir()) for p in entries)


def _closed_shards(out: Path) -> bool:
    """Whether a build there closed a shard: a state file that lists one (or cannot be read), or a shard file."""
    for state in (out / STATE_DIR).glob("rank-*.json"):
        try:
            if json.loads(state.read_text()).get("shards"):
                return True
        except (OSError, ValueError, AttributeError):
            return True
    return any((out / SHARDS_DIR).glob("*.arrow"))


def _claim_early(options: BuildOptions, record: dict) -> None:
    """Rank 0, before anything is loaded: another build holding the directory, _decide, and whether --out
    can be written (so that a wrong --out costs no teacher load)."""
    out = Path(options.out)
    if (out / STATE_DIR / "rank-000.lock").exists():
        _writable(lambda: _lock(out, 0).close(), out)  # the real guard is the lock taken in _prepare_dir
    _decide(options, record, early=True)
    parent = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BuildError(f"{out}: cannot write there ({parent} is not writable); choose another --out or fix "
                         "its permissions")


def _writable(action, out: Path):
    """Run ``action`` (a write into --out); BuildError naming the path when the OS refuses it."""
    try:
        return action()
    except OSError as e:
        if _disk_full(e):
            raise
        raise BuildError(f"{out}: cannot write there ({e.strerror or e}: {e.filename or out}); choose another "
                         "--out or fix its permissions") from None


def _prepare_dir(options: BuildOptions, rank: int, record: dict):
    """Lock this rank's part of the directory; rank 0 then decides for good, clears what a replaced cache
    held and writes the marker; every rank checks its own shards. Returns (resume state, {} for a fresh
    start; the held lock). Nothing is deleted before the lock is held, so a second build into the same
    directory is refused without touching the first one's files."""
    out = Path(options.out)

    def take_lock():
        (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
        return _lock(out, rank)

    lock = _writable(take_lock, out)
    try:
        resume = options.resume
        if rank == 0:
            mode = _decide(options, record, early=False)
            if mode == "overwrite":
                _clear(out)
            _writable(lambda: write_marker(out, "cache", record), out)
            _publish(out, MARKER)
            resume = mode == "resume"
        return _writable(lambda: _check_shards(rank, out, resume), out), lock
    except BaseException:
        lock.close()
        raise


def _clear(out: Path) -> None:
    """Delete a cache's own entries (manifest, shards/, tokenizer/, state/ but its held lock files, the marker,
    skipped.jsonl, temporary files of theirs); anything else in the directory stays."""
    doomed = [out / name for name in (MANIFEST_NAME, SHARDS_DIR, TOKENIZER_DIR, MARKER, SKIPPED_NAME, "config.yaml")]
    doomed += [p for p in (out / STATE_DIR).iterdir() if p.suffix != ".lock"]  # lock files stay: they are held
    doomed += [*out.glob(f"{MANIFEST_NAME}.partial-*"), *out.glob(f"{MARKER}.tmp-*")]

    def delete():
        for p in doomed:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)

    _writable(delete, out)
    if (remote := staged(out)) is not None:
        remote.clear()


def _check_shards(rank: int, out: Path, resume: bool) -> dict:
    """This rank's resume state (its closed shards, their checksums checked), {} for a fresh start; any other
    file of the rank's in shards/ (an unfinished shard of an interrupted run) is removed."""
    if (remote := staged(out)) is not None:
        return remote.check_shards(rank, resume)
    (out / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_DIR / f"rank-{rank:03d}.json"
    state = json.loads(state_path.read_text()) if (resume and state_path.exists()) else {}
    done = {s["file"] for s in state.get("shards", [])}
    for s in state.get("shards", []):
        if not (out / s["file"]).is_file():
            raise BuildError(f"{out / s['file']}: missing, though {state_path} records it; rebuild with --overwrite")
        if file_sha256(out / s["file"]) != s["sha256"]:
            raise BuildError(f"{out / s['file']}: checksum differs from {state_path}; rebuild with --overwrite")
    for leftover in (out / SHARDS_DIR).glob(f"part-r{rank:03d}-*"):
        if f"{SHARDS_DIR}/{leftover.name}" not in done:
            leftover.unlink()  # an unfinished shard (or a .partial file) of an interrupted run
    return state


def _lock(out: Path, rank: int):
    f = open(out / STATE_DIR / f"rank-{rank:03d}.lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise BuildError(f"{out}: another build is writing into this cache (rank {rank} is locked)") from None
    return f


# ---------------------------------------------------------------------------------------------------
# The pass.


def _batches(options: BuildOptions, tokenizer, counts: DocumentCounts, rank: int, world: int, skip_rows: int,
             limit: int | None = None):
    """(global row indices, rows) per batch of this rank, after the first ``skip_rows`` of its rows. The build's
    rows are every row, or those of --slice i/n (global row g with g mod n = i); the k-th of them goes to rank
    k mod world (format.slices). ``limit``: stop after this many rows of the rank's (the sample of --estimate)."""
    part = Slice.parse(options.slice) if options.slice is not None else Slice(0, 1)
    mine, seen = [], 0
    for i, row in enumerate(iter_packed_rows(options.data, tokenizer, counts)):
        if not part.holds(i) or part.position(i) % world != rank:
            continue
        seen += 1
        if seen <= skip_rows:
            continue
        mine.append((i, row))
        if len(mine) == options.batch_size or seen == limit:
            yield mine
            mine = []
        if seen == limit:
            return
    if mine:
        yield mine


@dataclass
class _Pending:
    """A batch whose forward pass is done and whose targets are not computed yet: either the model's logits
    (B, T, V) (``logits``) or the final hidden states of its P target positions (``hidden``), whose logits
    the split head computes a chunk of positions at a time."""

    rows: RowBatch
    """Everything but the targets, filled in by finish()."""
    row_indices: list[int]
    logits: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    """(P, H) final hidden states of the target positions, in row order."""
    labels: torch.Tensor | None = None
    """(P,) their next tokens."""
    uniforms: torch.Tensor | None = None
    """(P, samples) of sampled targets."""
    split: SplitHead | None = None

    def finish(self, options: BuildOptions, vocab_size: int) -> RowBatch:
        spec, backend = options.targets, options.targets_backend
        if self.hidden is None:
            t = compute_targets(self.logits, self.ids, self.mask, spec, vocab_size, row_indices=self.row_indices,
                                backend=backend)
        else:
            parts = []
            for a, b in _chunks(len(self.labels), options.head_chunk):
                u = None if self.uniforms is None else self.uniforms[a:b]
                parts.append(position_targets(self.split.logits(self.hidden[a:b]), self.labels[a:b], spec,
                                              vocab_size, u, backend))
            t = join_targets(parts, spec)
        rb, self.logits, self.hidden = self.rows, None, None
        rb.target_offsets, rb.target_ids, rb.target_logprobs = t.target_offsets, t.target_ids, t.target_logprobs
        rb.target_counts, rb.label_logprob, rb.rest_mass, rb.entropy = (t.target_counts, t.label_logprob,
                                                                       t.rest_mass, t.entropy)
        return rb


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    """[a, b) ranges covering n positions in ceil(n / size) chunks of nearly equal length (a small last chunk
    would take another matmul kernel, whose rounding differs)."""
    count = max(-(-n // size), 1)
    bounds = [n * i // count for i in range(count + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _defer_targets(options: BuildOptions, device) -> bool:
    """Whether the writer thread computes the targets: for the numba pass over CPU logits (on a GPU the
    targets run on the device, and only compact results cross to the host)."""
    return device.type == "cpu" and options.targets.kind != "sample" and options.targets_backend != "torch"


def _split_head(options: BuildOptions, model, first_ids: torch.Tensor, device) -> SplitHead | None:
    """The model's SplitHead when the head can run over chunks of positions and gives the model's own logits
    (checked on the first batch's first row), else None with a one-line notice (teacher.head)."""
    if options.head_chunk == 0:
        return None
    split, why = split_head(model)
    if split is not None and options.hidden_layers and split.layers is None:
        split, why = None, "its decoder layers, where the hidden states are taken, were not found"
    if split is not None:
        why = split.check(model, first_ids.to(device))
        split = split if why is None else None
    if split is None:
        _note(f"the LM head runs over the whole batch at once (memory grows with batch x length x vocabulary): "
              f"{why}")
    return split


@torch.no_grad()
def _forward(model, split: SplitHead | None, batch, options: BuildOptions, vocab_size: int, pad_id: int, device,
             defer: bool = False) -> RowBatch | _Pending:
    lengths = [len(r.input_ids) for _, r in batch]
    T = max(lengths)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.bool)
    attn = torch.zeros((len(batch), T), dtype=torch.long)
    for b, (_, row) in enumerate(batch):
        n = len(row.input_ids)
        ids[b, :n] = torch.from_numpy(row.input_ids.astype(np.int64))
        mask[b, :n] = torch.from_numpy(row.target_mask)
        attn[b, :n] = 1
    padded = min(lengths) < T  # a mask only where there is padding: without one, attention stays causal-only
    attn = attn.to(device) if padded else None
    rb = RowBatch(row_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                  input_ids=np.concatenate([r.input_ids for _, r in batch]),
                  target_mask=np.concatenate([r.target_mask for _, r in batch]))
    rows, cols = torch.nonzero(mask, as_tuple=True)
    row_indices = [i for i, _ in batch]
    if split is None:
        out = model(input_ids=ids.to(device), attention_mask=attn, output_hidden_states=bool(options.hidden_layers),
                    use_cache=False)
        for layer in options.hidden_layers:
            rb.hidden[layer] = out.hidden_states[layer][rows.to(device), cols.to(device)].float().cpu().numpy()
        pending = _Pending(rb, row_indices, logits=out.logits, ids=ids.to(device), mask=mask.to(device))
    else:
        final, captured = split.hidden(ids.to(device), attn, rows, cols, tuple(options.hidden_layers))
        for layer in options.hidden_layers:
            rb.hidden[layer] = captured[layer].float().cpu().numpy()
        uniforms = None
        if options.targets.kind == "sample":
            uniforms = position_uniforms(options.targets, row_indices, rows, cols, T, final.device)
        pending = _Pending(rb, row_indices, hidden=final, labels=ids[rows, cols + 1].to(final.device),
                           uniforms=uniforms, split=split)
    return pending if defer else pending.finish(options, vocab_size)


class _Writer(threading.Thread):
    """Encodes and writes batches from a bounded queue; records resume state after each shard."""

    def __init__(self, writer: CacheWriter, state_path: Path, rows_done: int, max_batches: int,
                 finish=None):
        super().__init__(daemon=True, name="teachercache-writer")
        self.writer, self.state_path, self.rows_done = writer, state_path, rows_done
        self.finish = finish
        """Turns a _Pending batch into a RowBatch (its targets computed here)."""
        self.queue: queue.Queue = queue.Queue(maxsize=max_batches)
        self.error: BaseException | None = None

    ABORT = object()
    """Put by the main thread when the pass failed: the open shard is dropped, not closed early, so that
    a resumed build cuts its shards exactly where an uninterrupted one would."""

    def run(self):
        try:
            while (item := self.queue.get()) is not None:
                if item is self.ABORT:
                    self.writer.abort()
                    return
                rows_done, batch = item
                if isinstance(batch, _Pending):
                    batch = self.finish(batch)
                n_shards = len(self.writer.shards)
                self.writer.write(batch)
                self.rows_done = rows_done
                if len(self.writer.shards) > n_shards:
                    self._save()
            if self.writer.close_shard() is not None or not self.state_path.exists():
                self._save()  # a rank that closed no shard (it had no rows) says so: the manifest reads every rank
        except BaseException as e:  # handed to the main thread
            self.error = e
            self.writer.abort()
            while self.queue.get() not in (None, self.ABORT):  # let the producer finish
                pass

    def put(self, rows_done: int, batch: RowBatch | _Pending):
        if self.error is not None:
            raise self.error
        self.queue.put((rows_done, batch))

    def _save(self):
        """The shards closed so far and the rows they cover, atomically."""
        write_json_atomic(self.state_path, {"shards": [asdict(s) for s in self.writer.shards],
                                            "rows_done": self.rows_done})
        _publish(self.state_path.parent.parent, f"{STATE_DIR}/{self.state_path.name}")


def build_cache(options: BuildOptions) -> BuildResult:
    """Run the teacher over the data and write a complete cache (see the module docstring). An --out that is a URL
    is built in a local staging directory and published file by file (teacher.remote_build)."""
    if is_url(options.out):
        return build_remote(options)
    try:
        return _build_cache(options)
    except Exception as e:
        if not _disk_full(e):
            raise
        raise BuildError(f"{options.out}: the disk is full ({e}); the shards finished so far are kept: free "
                         "space there, then run the same command with --resume") from None


def _disk_full(e: BaseException) -> bool:
    """ENOSPC/EDQUOT from Python, pyarrow (an OSError whose text carries the errno) or tokenizers (a plain
    Exception with the OS's text)."""
    text = str(e)
    return (getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in text
            or "Disk quota exceeded" in text or "os error 28" in text)


def _build_cache(options: BuildOptions) -> BuildResult:
    start = time.time()
    device = resolve_device(options.device)
    rank, world = rank_and_world(device.type == "cuda")
    dtype = resolve_dtype(options.dtype, device)
    if rank == 0:
        _check_paths(options)  # before the record: the input files' fingerprint must not read the cache
    if options.device_map is not None and world > 1:
        raise BuildError("--device-map places one teacher over all visible devices in one process: run it without "
                         "torchrun (or, under torchrun, give each rank a teacher that fits its device)")
    tp = options.tp_size
    if world % tp:
        raise BuildError(f"--tp-size {tp} does not divide the {world} ranks of torchrun: give --nproc-per-node x "
                         f"--nnodes a multiple of {tp}")
    # Tensor parallelism: ranks r .. r + tp - 1 hold one teacher and run the same rows; the first of them (the
    # group's lead) writes. Groups share out the rows as ranks do without it: group g of world / tp.
    lead, group, groups = rank % tp == 0, rank // tp, world // tp
    record = content_record(options, device, dtype, world)
    if rank == 0:
        _claim_early(options, record)
    tokenizer, model = load_teacher(options, device, dtype, world)
    load_seconds = time.time() - start
    vocab_size = len(tokenizer)
    _check_model(options, model, vocab_size)
    state, lock = _prepare_ranks(options, rank, world, record, tp)
    totals, counts, report = None, DocumentCounts(), None
    try:
        if rank == 0:
            _writable(lambda: tokenizer.save_pretrained(Path(options.out) / TOKENIZER_DIR), Path(options.out))
            _publish(Path(options.out), TOKENIZER_DIR)
            report = _SkipReport(Path(options.out), scan_inputs(options.data.paths).ignored)
            counts.on_bad = report
        writer = _open_writer(options, model, vocab_size, group, state) if lead else None
        try:
            rows_done = _teacher_pass(options, model, tokenizer, vocab_size, device, writer, counts, group, groups,
                                      state.get("rows_done", 0))
        except TooManyBadRecords as e:
            raise BuildError(f"{e}; every one is listed in {Path(options.out) / SKIPPED_NAME}. The shards "
                             "finished so far are kept: run the same command with --resume") from None
        if report is not None:
            report.close()  # complete before the manifest says the cache is
        if rows_done == 0 and world == 1 and options.slice is not None and counts.used:
            raise BuildError(f"--slice {options.slice}: the slice holds no rows, the corpus packs into fewer rows "
                             "than there are slices; run fewer slices (a smaller n)")
        if rows_done == 0 and world == 1:
            raise BuildError(f"{', '.join(options.data.paths)}: the corpus gave no rows ({counts.read} documents "
                             f"read, skipped: {dict(counts.skipped) or 'none'}); no shard was written: correct "
                             "--data and run the same command again")
        if world > 1:
            torch.distributed.barrier()
        if rank == 0:
            totals = _write_manifest(options, writer, model, tokenizer, vocab_size, dtype, device, counts, groups,
                                     report)
        if world > 1:
            torch.distributed.barrier()
    finally:
        if report is not None:
            report.close()
        lock.close()
        shutil.rmtree(Path(options.out) / STATE_DIR / OFFLOAD_DIR, ignore_errors=True)
    seconds = time.time() - start
    manifest_path = Path(options.out) / MANIFEST_NAME
    if totals is None:  # ranks other than 0
        return BuildResult(manifest_path, 0, 0, 0, seconds, load_seconds)
    return BuildResult(manifest_path, totals.rows, totals.tokens, totals.bytes, seconds, load_seconds,
                       bad_records=counts.bad, ignored_files=len(report.ignored))


class _NoLock:
    """The lock of a rank that writes nothing (a tensor-parallel group's other ranks)."""

    def close(self) -> None:
        pass


def _prepare_ranks(options: BuildOptions, rank: int, world: int, record: dict, tp: int = 1):
    """Every writing rank's _prepare_dir (under tensor parallelism the lead of each group, as rank
    rank // tp), rank 0's first: it decides, and clears a cache it replaces. The other ranks of a group get
    their lead's resume state and a lock that holds nothing."""
    state, lock = {}, _NoLock()
    if rank == 0:
        state, lock = _prepare_dir(options, 0, record)
    if world > 1:
        torch.distributed.barrier()
    if rank != 0 and rank % tp == 0:
        state, lock = _prepare_dir(options, rank // tp, record)
    if tp > 1:
        states = [None] * world
        torch.distributed.all_gather_object(states, state if rank % tp == 0 else None)
        state = states[rank - rank % tp]
    return state, lock


class _SkipReport:
    """Rank 0's account of what the pass did not use: the first SHOW_BAD bad records and ignored files on
    stderr, every one in skipped.jsonl beside the manifest (one JSON object per line: file, line, reason),
    written as they come. A resumed pass reads every document again, so the file is started afresh."""

    def __init__(self, out: Path, ignored: list):
        self.path, self.file, self.shown = out / SKIPPED_NAME, None, 0
        self.path.unlink(missing_ok=True)
        _publish(out, SKIPPED_NAME)
        self.ignored = [str(f) for f, _ in ignored]
        for i, (f, why) in enumerate(ignored):
            if i < SHOW_BAD:
                _note(f"{f}: ignored: {why}")
            self._write(str(f), None, f"ignored: {why}")
        if len(ignored) > SHOW_BAD:
            _note(f"{len(ignored) - SHOW_BAD} more files in --data ignored; all are listed in {self.path}")

    def __call__(self, record: BadRecord) -> None:
        if self.shown < SHOW_BAD:
            _note(f"skipped {record}")
        elif self.shown == SHOW_BAD:
            _note(f"more bad records: they are listed in {self.path} only")
        self.shown += 1
        self._write(record.file, record.line, record.reason)

    def _write(self, file: str, line: int | None, reason: str) -> None:
        if self.file is None:
            self.file = open(self.path, "a", encoding="utf-8")
        self.file.write(json.dumps({"file": file, "line": line, "reason": reason}) + "\n")

    def close(self) -> None:
        if self.file is not None and not self.file.closed:
            self.file.close()
            _publish(self.path.parent, SKIPPED_NAME)


def _open_writer(options: BuildOptions, model, vocab_size: int, rank: int, state: dict) -> CacheWriter:
    """This rank's shard writer, numbering on after the shards a resumed build has closed already."""
    layout = S.Layout(vocab_size=vocab_size, sampled=options.targets.kind == "sample",
                      hidden_layers=tuple(options.hidden_layers),
                      hidden_width=model.config.hidden_size if options.hidden_layers else 0,
                      hidden_dtype=options.hidden_dtype)
    done = [ShardInfo(**s) for s in state.get("shards", [])]
    remote = staged(options.out)
    writer = CacheWriter(Path(options.out), layout, rank=rank, shard_bytes=options.shard_bytes,
                         first_index=len(done), zstd_level=options.zstd_level,
                         publish=remote.publish if remote is not None else None)
    writer.shards = list(done)
    return writer


def _teacher_pass(options: BuildOptions, model, tokenizer, vocab_size: int, device, writer: CacheWriter,
                  counts: DocumentCounts, rank: int, world: int, rows_done: int, limit: int | None = None) -> int:
    """Forward passes over this rank's rows after the first ``rows_done``, each batch handed to the writer
    thread; returns the rows done in all. Raises the writer's error, if it had one. ``limit``: stop after that
    many rows (--estimate's sample)."""
    # Under tensor parallelism the head is a collective of the group: every rank computes the targets in the
    # same order on the main thread, and only the group's lead (the one with a writer) keeps them.
    defer = _defer_targets(options, device) and options.tp_size == 1
    thread = None
    if writer is not None:
        thread = _Writer(writer, Path(options.out) / STATE_DIR / f"rank-{rank:03d}.json", rows_done,
                         1 if defer else options.queue_batches, lambda p: p.finish(options, vocab_size))
        thread.start()
    tokens, pass_start = 0, time.time()
    pad = pad_id(tokenizer)
    bar = _progress(options, rank) if writer is not None else None
    finished, split, first = False, None, True
    try:
        for batch in _batches(options, tokenizer, counts, rank, world, rows_done, limit):
            if first:
                first_row = torch.from_numpy(batch[0][1].input_ids.astype(np.int64))[None]
                split, first = _split_head(options, model, first_row, device), False
            rb = _forward(model, split, batch, options, vocab_size, pad, device, defer)
            rows_done += len(batch)
            tokens += sum(len(row.input_ids) for _, row in batch)
            if thread is not None:
                thread.put(rows_done, rb)
            if bar is not None:
                bar.update(counts.read - bar.n)
                bar.set_postfix(rows=rows_done, tokens_per_s=f"{tokens / max(time.time() - pass_start, 1e-9):.0f}")
        finished = True
    finally:
        if thread is not None:
            thread.queue.put(None if finished else _Writer.ABORT)
            thread.join()
        if bar is not None:
            bar.close()
    if thread is not None and thread.error is not None:
        raise thread.error
    return rows_done


@dataclass
class SamplePass:
    """What `build --estimate` measures of the teacher pass over a sample (teacher.estimate)."""

    rows: int
    shards: list[ShardInfo]
    """The sample's shards, closed."""
    seconds: float
    """The pass over the sample, from its first batch to its last shard closed (after the warm-up)."""
    load_seconds: float
    """Loading the teacher and its tokenizer."""
    tokenizer: object


def sample_pass(options: BuildOptions, rows: int) -> SamplePass:
    """The teacher pass of ``options`` in this process over the first ``rows`` rows of --data (all of them,
    --slice aside), as the build runs it, its shards written under ``options.out``: a scratch directory
    (--estimate's temporary one) that gets shards and state files only. A warm-up pass over the first batch
    goes before (into ``out``/warmup), so that the timed one pays no first-call costs (kernels, numba, the
    allocator)."""
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    options = replace(options, slice=None, progress=False)
    start = time.time()
    tokenizer, model = load_teacher(options, device, dtype)
    load_seconds = time.time() - start
    vocab_size = len(tokenizer)
    _check_model(options, model, vocab_size)
    for run, limit in (("warmup", options.batch_size), ("sample", rows)):
        scratch = replace(options, out=str(Path(options.out) / run))
        (Path(scratch.out) / STATE_DIR).mkdir(parents=True)
        writer = _open_writer(scratch, model, vocab_size, 0, {})
        start = time.time()
        done = _teacher_pass(scratch, model, tokenizer, vocab_size, device, writer, DocumentCounts(), 0, 1, 0, limit)
    return SamplePass(done, list(writer.shards), time.time() - start, load_seconds, tokenizer)


def _write_manifest(options: BuildOptions, writer: CacheWriter, model, tokenizer, vocab_size: int, dtype,
                    device, counts: DocumentCounts, world: int, report: _SkipReport):
    """Rank 0, once every rank is done: the manifest over all ranks' shards (from their state files), with
    the bad records and ignored files counted in ``extra``. Returns its totals."""
    out = Path(options.out)
    shards = []
    remote = staged(out)  # a build into a URL: the ranks of other nodes staged their state elsewhere
    for r in range(world):
        rs = remote.read_state(r) if remote else json.loads((out / STATE_DIR / f"rank-{r:03d}.json").read_text())
        shards += [ShardInfo(**s) for s in rs.get("shards", [])]
    manifest = writer.finish(
        targets=options.targets,
        teacher=TeacherInfo(name_or_path=options.teacher, config_sha256=config_fingerprint(model.config),
                            dtype=str(dtype).replace("torch.", ""),
                            output_size=model.get_output_embeddings().weight.shape[0]),
        tokenizer=TokenizerInfo(fingerprint=tokenizer_fingerprint(tokenizer), vocab_size=vocab_size),
        data=DataInfo(sources=list(options.data.paths), fingerprint=data_fingerprint(options.data),
                      seq_len=options.data.seq_len, packing=options.data.packing,
                      documents_read=counts.read, documents_used=counts.used,
                      documents_skipped=dict(counts.skipped)),
        extra={"world_size": world, "tp_size": options.tp_size, "batch_size": options.batch_size, "device": str(device),
               "zstd_level": options.zstd_level, "bad_records": counts.bad, "ignored_files": len(report.ignored),
               "skipped_report": SKIPPED_NAME if report.file is not None else None,
               **({SLICE_KEY: Slice.parse(options.slice).record()} if options.slice is not None else {})},
        all_shards=shards)
    return manifest.totals


def _progress(options: BuildOptions, rank: int):
    """A bar over the input documents (their count is cheap to know, so it has an ETA), with rows and
    tokens/s beside it; rank 0 only."""
    if not options.progress or rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(desc="teacher pass", unit="doc", total=count_documents(options.data), dynamic_ncols=True)
