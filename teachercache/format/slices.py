"""``build --slice i/n``: the deterministic partition of a build's rows over independent jobs.

Row g of the one-job build (its global row index: the g-th row the corpus packs into, counted from 0, the
index that seeds its sampled targets) belongs to slice ``g mod n``. The rule depends on g and n alone, not
on torchrun's world size, the batch size or the machine, so n jobs (a SLURM array, a Kubernetes indexed
Job), each building ``--slice i/n`` with any number of ranks, write every row exactly once between them,
and ``teachercache merge`` joins their caches into one with the rows and values the one job would have
written. Under torchrun a slice's rows are shared out as a one-job build's are: the k-th row of slice i
(k = g div n) goes to rank k mod w.

A slice's manifest records it in ``extra["slice"]``: ``{"index": i, "count": n, "rule": RULE}``; merge
refuses parts whose rule is not this one.
"""

from __future__ import annotations

from dataclasses import dataclass

from teachercache.errors import CacheFormatError, OptionError

RULE = "row g of the one-job build belongs to slice g mod count"
"""The partition rule, as slice manifests record it (merge compares it word for word)."""
EXTRA_KEY = "slice"
"""The key of a slice's record in the manifest's ``extra``."""
MAX_SLICES = 1 << 20
"""Slices of one build at most (a merge lists every part)."""


@dataclass(frozen=True)
class Slice:
    """Slice ``index`` of ``count``: the global rows g with g mod count = index."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str, flag: str = "--slice") -> "Slice":
        """``"i/n"`` -> Slice(i, n); OptionError naming ``flag`` unless 0 <= i < n <= MAX_SLICES."""
        index, sep, count = str(text).strip().partition("/")
        if sep and index.strip().isdigit() and count.strip().isdigit():
            i, n = int(index), int(count)
            if 0 <= i < n <= MAX_SLICES:
                return cls(i, n)
        raise OptionError(f"{flag} {text!r}: give i/n with 0 <= i < n (at most {MAX_SLICES} slices), e.g. "
                          f"{flag} 0/8 for the first of 8 jobs (SLURM: $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT "
                          "with --array=0-7)")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, row: int) -> bool:
        """Whether global row ``row`` belongs to this slice."""
        return row % self.count == self.index

    def position(self, row: int) -> int:
        """The index, within the slice, of global row ``row`` (one of the slice's)."""
        return row // self.count

    def record(self) -> dict:
        """What the slice's manifest records under extra["slice"]."""
        return {"index": self.index, "count": self.count, "rule": RULE}

    @classmethod
    def from_record(cls, value, where: str) -> "Slice":
        """The Slice a manifest's extra["slice"] records; CacheFormatError naming ``where`` otherwise."""
        if not isinstance(value, dict) or set(value) != {"index", "count", "rule"}:
            raise CacheFormatError(where, f"field extra.{EXTRA_KEY}: expected {{index, count, rule}}",
                                   "the manifest was edited or damaged: rebuild the slice")
        if value["rule"] != RULE:
            raise CacheFormatError(where, f"field extra.{EXTRA_KEY}.rule: {value['rule']!r} is not the partition "
                                   f"this release merges ({RULE!r})", "rebuild the slice with this release")
        i, n = value["index"], value["count"]
        if not (type(i) is int and type(n) is int and 0 <= i < n <= MAX_SLICES):
            raise CacheFormatError(where, f"field extra.{EXTRA_KEY}: index {i!r} of count {n!r} is not a slice "
                                   f"(0 <= index < count <= {MAX_SLICES})", "rebuild the slice")
        return cls(i, n)
