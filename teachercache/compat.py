"""Import paths that moved, kept working for one release (0.1's flat modules, 0.2's top-level ``student``).

Release 0.2 grouped the flat ``teachercache`` package into subpackages by concern (format, teacher,
inspect, interop, blackbox; the losses went to ``student.losses``). Release 0.3 installs the student
package as ``teachercache.student`` (no generic top-level ``student`` in site-packages). ``import
teachercache.cache``, ``from teachercache.kernels import KDConfig`` and, once ``teachercache`` is imported,
``from student.hf import DistillationTrainer`` still work: a finder on ``sys.meta_path`` answers each old
name with a module that forwards every attribute to the new module (with the few renamed attributes
mapped), and warns once with a DeprecationWarning naming the new path. Remove in release 0.4.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

MOVED: dict[str, tuple[str, dict[str, str]]] = {
    # old module: (new module, {old attribute: new attribute, or "module:attribute" where it went elsewhere})
    "teachercache.schema": ("teachercache.format.schema", {}),
    "teachercache.batch": ("teachercache.format.batch", {}),
    "teachercache.codec": ("teachercache.format.codec", {
        "HAS_BMI2": "teachercache.format.bits:HAS_BMI2",
        "position_contexts": "teachercache.format.references:position_contexts",
        "quantizer_arrays": "teachercache.format.quantizer:quantizer_arrays",
        "logprob_table": "teachercache.format.quantizer:logprob_table",
        "quantize_reference": "teachercache.format.quantizer:quantize_reference"}),
    "teachercache.records": ("teachercache.format.records", {}),
    "teachercache.shards": ("teachercache.format.shards", {}),
    "teachercache.manifest": ("teachercache.format.manifest", {}),
    "teachercache.cache": ("teachercache.format.cache", {}),
    "teachercache.fastexp": ("teachercache.numerics", {}),
    "teachercache.data": ("teachercache.teacher.corpus", {"Row": "PackedRow", "iter_rows": "iter_packed_rows"}),
    "teachercache.targets": ("teachercache.teacher.targets", {}),
    "teachercache.build": ("teachercache.teacher.build", {}),
    "teachercache.rows": ("teachercache.inspect.rows", {"Row": "CacheRow", "iter_rows": "iter_cache_rows"}),
    "teachercache.show": ("teachercache.inspect.show", {"load_tokenizer": "cache_tokenizer"}),
    "teachercache.plot": ("teachercache.inspect.plot", {}),
    "teachercache.verify": ("teachercache.inspect.verify", {}),
    "teachercache.diff": ("teachercache.inspect.diff", {}),
    "teachercache.export": ("teachercache.interop.export", {}),
    "teachercache.vllm": ("teachercache.interop.vllm", {}),
    "teachercache.import_api": ("teachercache.interop.openai_chat", {}),
    "teachercache.templates": ("teachercache.blackbox.templates", {}),
    "teachercache.generate": ("teachercache.blackbox.generate", {}),
    "teachercache.stepbystep": ("teachercache.blackbox.stepbystep", {}),
    "teachercache.kernels": ("teachercache.student.losses", {
        "TAILS": "teachercache.student.kd_types:TAILS",
        "fused_linear_sparse_kd": "teachercache.student.fused_head:fused_linear_sparse_kd",
        "_FusedLinearKD": "teachercache.student.fused_head:_FusedLinearKD"}),
    "student.data": ("teachercache.student.dataset", {"collate_rows": "teachercache.student.collate:collate_rows",
                                                      "check_row": "teachercache.student.collate:check_row",
                                                      "IGNORE_INDEX": "teachercache.student.collate:IGNORE_INDEX"}),
    "student.cli": ("teachercache.cli.student", {}),
    # release 0.3: the student package installs as teachercache.student (no top-level ``student``)
    "student": ("teachercache.student", {}),
    **{f"student.{name}": (f"teachercache.student.{name}", {}) for name in (
        "checkpoints", "collate", "dataset", "demo", "evaluate", "fused_head", "hf", "hint", "kd_types", "losses",
        "model", "options", "train")},
}
"""``teachercache.inspect`` itself (once a module, now the inspection package) re-exports the old
module's functions in its ``__init__``, so it is not listed here."""


class _Forward(types.ModuleType):
    """An old module name: every attribute is read from the new module (renamed ones mapped)."""

    def __init__(self, old: str, new: types.ModuleType, renamed: dict[str, str]):
        super().__init__(old, f"Moved to {new.__name__}.")
        self._new, self._renamed = new, renamed

    def __getattr__(self, name: str):
        module, _, attr = self._renamed.get(name, name).rpartition(":")
        return getattr(importlib.import_module(module) if module else self._new, attr)

    def __dir__(self):
        return sorted(set(dir(self._new)) | set(self._renamed))


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        new_name, renamed = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new_name}; the old path goes in teachercache 0.4",
                      DeprecationWarning, stacklevel=3)
        return _Forward(spec.name, importlib.import_module(new_name), renamed)

    def exec_module(self, module):
        pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.machinery.ModuleSpec(fullname, _Loader())
        return None


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (called by the ``teachercache`` package)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
