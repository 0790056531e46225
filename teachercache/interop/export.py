"""`teachercache export`: a cache as a dataset other trainers read.

``axolotl``: one parquet file that Axolotl's knowledge-distillation plugin trains from as it is, checked
against Axolotl's source (axolotl-ai-cloud/axolotl; paths below are under src/axolotl/):

- the file loads as an already-tokenized dataset: a local ``.parquet`` path is read with the datasets
  "parquet" builder (utils/data/shared.py), and a Dataset with ``input_ids``, ``attention_mask`` and
  ``labels`` columns skips prompt tokenization (``_is_dataset_already_tokenized`` in
  utils/data/wrappers.py);
- ``target_token_ids`` / ``target_logprobs`` / ``target_mask`` (T × K per row) are collated as its collator
  pads them (integrations/kd/collator.py: id 0, log-prob -1e9, mask 0) and paired with the student's
  position t without a shift, while ``labels`` is shifted by one for the cross-entropy term
  (integrations/kd/kernels/liger.py, the loss integrations/kd/trainer.py builds);
- that loss uses the teacher's log-probs unchanged (no tempering, no renormalising) and divides only the
  student's logits by ``kd_temperature``: the exported log-probs must be at the temperature the user sets
  as ``kd_temperature``. By default they are the cache's own (its build temperature);
  ``temperature`` re-tempers them over the stored ids as Axolotl's dataset loader does
  (integrations/kd/chat_template.py: p_T2 ∝ p_T1^(T1/T2), renormalised). The export records the setting in
  its metadata and the CLI prints it;
- with ``kd_normalize_topk`` the student's gathered log-probs are renormalised over all K slots of a
  position, padded ones included (integrations/kd/utils.py ``normalize_logprobs``, called before the
  mask is applied). Caches whose stored sets differ in size (nucleus, sample, a top-k cache with short
  sets) put padded id-0 slots at target positions, so the export warns (``ExportWarning``) that
  kd_normalize_topk must stay false.

``hf``: a ``datasets`` save_to_disk directory holding the cache itself, decoded. Both stream one record
batch at a time. docs/interop.md has every column, the alignment of positions and an Axolotl config.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from teachercache.errors import TeachercacheError, check_number
from teachercache.format.cache import Cache
from teachercache.format.manifest import MANIFEST_NAME
from teachercache.format.outputs import describe, identify, marker_json, options_record, write_marker
from teachercache.format.shards import file_sha256
from teachercache.inspect.rows import CacheRow, iter_cache_rows

FORMATS = ("axolotl", "hf")
EXPORT_KEY = b"teachercache"
"""Parquet metadata key of an exported file: the export's marker (kind, options, fingerprint, and under
options.axolotl the Axolotl settings the file needs)."""
PAD_LOGPROB = -1e9
IGNORE_INDEX = -100


class ExportError(TeachercacheError):
    """An export that cannot be written as asked."""


class ExportWarning(UserWarning):
    """An export that is fine but needs an Axolotl setting (printed by the CLI, recorded in the file)."""


@dataclass(frozen=True)
class ExportOptions:
    format: str = "axolotl"
    """axolotl (one parquet file) or hf (a datasets save_to_disk directory)."""
    renormalize: bool = True
    """axolotl: renormalise each position's stored log-probs to sum to 1 over the stored ids (--no-renormalize
    is refused together with a --temperature other than the build temperature)."""
    temperature: float | None = None
    """axolotl: temperature of the exported log-probs, re-tempered from the cache's build temperature over the
    stored ids (default: keep the build temperature). Set Axolotl's kd_temperature to it (the export says so)."""
    overwrite: bool = False
    """Replace an existing output."""
    rows_per_group: int = 256
    """axolotl: rows per parquet row group."""

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ExportError(f"--format {self.format!r}: choose one of {FORMATS}")
        if self.temperature is not None:
            check_number("export", "temperature (--temperature)", self.temperature, low=0, low_open=True)
            if self.format != "axolotl":
                raise ExportError(f"--temperature {self.temperature:g} applies to --format axolotl only; the hf "
                                  "export holds the cache's log-probs as stored: drop --temperature")


AXOLOTL_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("attention_mask", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int64())),
    ("target_token_ids", pa.list_(pa.list_(pa.int64()))),
    ("target_logprobs", pa.list_(pa.list_(pa.float32()))),
    ("target_mask", pa.list_(pa.list_(pa.int32()))),
])


@dataclass(frozen=True)
class AxolotlSettings:
    """What Axolotl's KD plugin must be told about one axolotl export: written into the file's metadata
    (``options.axolotl`` of its ``teachercache`` record) and printed by the CLI."""

    kd_temperature: float
    """Temperature of the exported log-probs; Axolotl's kd_temperature must equal it."""
    build_temperature: float
    """The cache's build temperature (manifest targets.temperature)."""
    variable_k: str | None = None
    """Why stored sets differ in size (and K-padding reaches target positions), or None when they do not."""

    def config(self) -> dict:
        """The Axolotl config keys this export needs, with their values."""
        return {"kd_temperature": self.kd_temperature} | ({"kd_normalize_topk": False} if self.variable_k else {})

    def notes(self) -> list[str]:
        """One line per thing to act on: the kd_temperature to set, then the warnings."""
        origin = ("the cache's build temperature" if self.kd_temperature == self.build_temperature
                  else f"re-tempered from the cache's build temperature {self.build_temperature:g}")
        return [f"set kd_temperature: {self.kd_temperature:g} in the Axolotl config ({origin})",
                *(f"warning: {w}" for w in self.warning_messages())]

    def warning_messages(self) -> list[str]:
        """The ExportWarning messages of this export (none when every stored set has the same size)."""
        if not self.variable_k:
            return []
        return [f"{self.variable_k}; shorter sets are padded with id 0 (mask 0) to the row's longest (by Axolotl's "
                "collator to the batch's longest), and Axolotl's kd_normalize_topk renormalises the student over every "
                "slot, padded ones included: set kd_normalize_topk: false (or leave it unset)"]

    def record(self) -> dict:
        return {"config": self.config(), "build_temperature": self.build_temperature, "notes": self.notes()}


def axolotl_settings(cache: Cache, options: ExportOptions) -> AxolotlSettings:
    """The settings an axolotl export of ``cache`` needs; ExportError for a combination that cannot be written:
    re-tempering without renormalising, or re-tempering a sampled cache's counts."""
    spec, totals = cache.manifest.targets, cache.manifest.totals
    build_t = float(spec.temperature)
    wanted = build_t if options.temperature is None else float(options.temperature)
    where = f"{cache.path / MANIFEST_NAME} (targets.temperature {build_t:g})"
    if wanted != build_t and not options.renormalize:
        raise ExportError(f"{where}: --temperature {wanted:g} with --no-renormalize: re-tempered log-probs are a "
                          "distribution only once renormalised over the stored ids; drop --no-renormalize, or drop "
                          f"--temperature to keep the build temperature {build_t:g}")
    if wanted != build_t and cache.layout.sampled:
        raise ExportError(f"{where}: a sampled cache (targets.kind sample) holds counts of draws made at "
                          f"{build_t:g}, which cannot be re-tempered to {wanted:g}; drop --temperature (and set "
                          f"kd_temperature: {build_t:g}), or build the cache again with --temperature {wanted:g}")
    variable_k = None
    if spec.kind != "topk":
        variable_k = f"targets.kind {spec.kind}: stored sets differ in size from position to position"
    elif totals.target_entries != totals.target_positions * (spec.k or 0):
        variable_k = (f"a top-k cache with short stored sets ({totals.target_entries:,} entries over "
                      f"{totals.target_positions:,} positions, k {spec.k})")
    return AxolotlSettings(kd_temperature=wanted, build_temperature=build_t, variable_k=variable_k)


def labels_of(row: CacheRow) -> np.ndarray:
    """(T,) int64: input_ids[t] where position t-1 carries a target, else -100 (label 0 is always -100)."""
    labels = np.full(len(row.input_ids), IGNORE_INDEX, np.int64)
    labels[row.positions + 1] = row.input_ids[row.positions + 1]
    return labels


def axolotl_row(row: CacheRow, renormalize: bool = True, samples: int | None = None, scale: float = 1.0) -> dict:
    """One cache row in Axolotl's KD columns (see the module docstring). ``scale`` is T_build / T_export, the
    factor re-tempering puts on the stored log-probs before they are renormalised (1: keep T_build)."""
    if scale != 1.0 and not renormalize:
        raise ExportError("re-tempering (scale != 1) needs renormalize: a re-tempered set sums to 1 only once "
                          "renormalised")
    T = len(row.input_ids)
    sizes = np.diff(row.offsets)
    K = max(int(sizes.max(initial=0)), 1)
    ids = np.zeros((T, K), np.int64)
    lps = np.full((T, K), PAD_LOGPROB, np.float32)
    mask = np.zeros((T, K), np.int32)
    for j, t in enumerate(row.positions.tolist()):
        e = row.entries(j)
        n = e.stop - e.start
        lp = np.asarray(row.logprobs[e], np.float64)
        if row.counts is not None:
            lp = np.log(row.counts[e] / (samples or row.counts[e].sum()))
        elif renormalize:
            lp = scale * lp                     # log p_T = (T_build / T) log p_T_build + const
            lp = lp - np.logaddexp.reduce(lp)
            if scale != 1.0 and not (lp >= np.finfo(np.float32).min).all():
                raise ExportError(f"row {row.index}: its log-probs re-tempered by T_build / T = {scale:g} do not fit "
                                  "float32; choose a --temperature nearer the cache's build temperature")
        ids[t, :n], lps[t, :n], mask[t, :n] = row.ids[e], lp, 1
    return {"input_ids": row.input_ids.astype(np.int32).tolist(), "attention_mask": [1] * T,
            "labels": labels_of(row).tolist(), "target_token_ids": ids.tolist(), "target_logprobs": lps.tolist(),
            "target_mask": mask.tolist()}


def hf_row(row: CacheRow) -> dict:
    """One cache row, decoded, in the hf export's columns."""
    pos = row.positions
    out = {"input_ids": row.input_ids.astype(np.int32).tolist(), "target_mask": row.target_mask.tolist(),
           "labels": labels_of(row).tolist(), "positions": pos.tolist(),
           "target_token_ids": [row.ids[row.entries(j)].tolist() for j in range(len(pos))],
           "target_logprobs": [row.logprobs[row.entries(j)].tolist() for j in range(len(pos))],
           "label_logprob": row.label_logprob.tolist(), "rest_mass": row.rest_mass.tolist(),
           "entropy": row.entropy.tolist()}
    if row.counts is not None:
        out["target_counts"] = [row.counts[row.entries(j)].tolist() for j in range(len(pos))]
    return out


def _hf_features(sampled: bool):
    from datasets import Features, List, Value

    def nested(value):
        return List(List(Value(value)))

    features = {"input_ids": List(Value("int32")), "target_mask": List(Value("bool")),
                "labels": List(Value("int64")), "positions": List(Value("int64")),
                "target_token_ids": nested("int32"), "target_logprobs": nested("float32"),
                "label_logprob": List(Value("float32")), "rest_mass": List(Value("float32")),
                "entropy": List(Value("float32"))}
    if sampled:
        features["target_counts"] = nested("int32")
    return Features(features)


def export_cache(path: str | os.PathLike, out: str | os.PathLike, options: ExportOptions = ExportOptions()) -> int:
    """Write the cache at ``path`` to ``out`` in ``options.format``; returns the number of rows written.

    ``out`` may not lie inside the cache, nor the cache inside ``out``; an existing ``out`` is replaced only
    with ``options.overwrite`` and only when it is an earlier export of this kind (a parquet file carrying
    the ``teachercache`` metadata key, or a directory with the export marker): nothing else is deleted.
    The file is written beside ``out`` under a temporary name and renamed into place at the end.

    axolotl: the file's metadata records the Axolotl settings it needs (``export_notes`` reads them back);
    an ExportWarning says that kd_normalize_topk must stay false when stored sets differ in size."""
    cache = Cache.open(path)
    out = Path(out)
    source, target = cache.path.resolve(), out.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise ExportError(f"{out}: the export would be written into (or over) its own source cache {cache.path}; "
                          "choose an --out outside it")
    settings = axolotl_settings(cache, options) if options.format == "axolotl" else None
    if out.exists() or out.is_symlink():
        _check_replaceable(out, options)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = options_record(options, frozenset({"overwrite"})) | {
        "cache": str(source) if cache.mirror is None else cache.location,
        "manifest_sha256": file_sha256(cache.path / MANIFEST_NAME)}
    if settings is None:
        return _write_hf(cache, out, record)
    rows = _write_axolotl(cache, out, options, record | {"axolotl": settings.record()},
                          scale=settings.build_temperature / settings.kd_temperature)
    for message in settings.warning_messages():
        warnings.warn(f"{out}: {message}", ExportWarning, stacklevel=2)
    return rows


def export_record(out: str | os.PathLike) -> dict:
    """The ``teachercache`` record of the axolotl export ``out`` (its marker: kind, fingerprint, options)."""
    try:
        metadata = pq.read_schema(out).metadata or {}
    except (OSError, pa.ArrowInvalid) as e:
        raise ExportError(f"{out}: not a readable parquet file ({e}); give an axolotl export") from None
    if EXPORT_KEY not in metadata:
        raise ExportError(f"{out}: not a teachercache export (no '{EXPORT_KEY.decode()}' metadata)")
    return json.loads(metadata[EXPORT_KEY])


def export_notes(out: str | os.PathLike) -> list[str]:
    """What the export ``out`` asks of its reader (the Axolotl settings, warnings), from its own metadata; an
    hf export directory asks nothing."""
    if Path(out).is_dir():
        return []
    return export_record(out)["options"].get("axolotl", {}).get("notes", [])


def _check_replaceable(out: Path, options: ExportOptions) -> None:
    """Refuse to replace ``out`` unless asked to and it is an export of the same format."""
    if not options.overwrite:
        raise ExportError(f"{out} already exists; add --overwrite to replace it (an earlier export only)")
    if out.is_symlink():
        raise ExportError(f"{out}: a symbolic link; export will not replace it: choose another --out")
    if options.format == "axolotl":
        if out.is_dir():
            raise ExportError(f"{out}: a directory, not an exported parquet file; --overwrite replaces only an "
                              "earlier export: choose another --out")
        try:
            metadata = pq.read_schema(out).metadata or {}
        except (OSError, pa.ArrowInvalid):
            metadata = {}
        if EXPORT_KEY not in metadata:
            raise ExportError(f"{out}: not a teachercache export (no '{EXPORT_KEY.decode()}' metadata); --overwrite "
                              "replaces only an earlier export: choose another --out")
        return
    if not out.is_dir():
        raise ExportError(f"{out}: a file, not an exported dataset directory; choose another --out")
    found, _ = identify(out)
    if found != "export":
        raise ExportError(f"{out}: not a teachercache export directory ({describe(out)}); --overwrite replaces "
                          "only an earlier export: choose another --out")


def _write_axolotl(cache: Cache, out: Path, options: ExportOptions, record: dict, scale: float) -> int:
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    n, group = 0, []
    samples = cache.manifest.targets.samples
    schema = AXOLOTL_SCHEMA.with_metadata({EXPORT_KEY: json.dumps(marker_json("export", record), default=str)})
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for row in iter_cache_rows(cache):
                group.append(axolotl_row(row, options.renormalize, samples, scale))
                if len(group) == options.rows_per_group:
                    writer.write_table(pa.Table.from_pylist(group, schema=schema))
                    n, group = n + len(group), []
            if group:
                writer.write_table(pa.Table.from_pylist(group, schema=schema))
                n += len(group)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def _write_hf(cache: Cache, out: Path, record: dict) -> int:
    """A datasets save_to_disk directory, built beside ``out`` and swapped in when complete."""
    try:
        from datasets import Dataset
    except ImportError:
        raise ExportError("--format hf needs the `datasets` package: pip install 'teachercache[hf]'") from None

    def rows():
        for row in iter_cache_rows(cache):
            yield hf_row(row)

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.build-") as work:
        dataset = Dataset.from_generator(rows, features=_hf_features(cache.layout.sampled), cache_dir=work)
        staged = Path(work) / "export"
        dataset.save_to_disk(str(staged))
        write_marker(staged, "export", record)
        if out.exists():
            shutil.rmtree(out)          # an earlier export of this kind (checked above)
        os.replace(staged, out)
        return len(dataset)
