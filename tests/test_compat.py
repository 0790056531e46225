"""Release 0.1's import paths and 0.2's top-level ``student`` keep working for one release once teachercache is
imported (teachercache.compat), with a DeprecationWarning."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from teachercache.compat import MOVED

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")   # the old paths are imported on purpose


def test_every_moved_module_forwards_to_its_new_home():
    for old, (new, renamed) in MOVED.items():
        parent = old.rpartition(".")[0]   # an old parent (student) warns on its own when imported first
        first = f"importlib.import_module({parent!r}); " if parent in MOVED else ""
        code = (f"import warnings, importlib, teachercache; {first}warnings.simplefilter('error', DeprecationWarning)\n"
                f"try:\n    importlib.import_module({old!r})\nexcept DeprecationWarning as w:\n    print(w)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0 and new in out.stdout, (old, out.stdout, out.stderr[-500:])
        module, target = importlib.import_module(old), importlib.import_module(new)
        names = [n for n in vars(target) if not n.startswith("_")]
        assert all(getattr(module, n) is getattr(target, n) for n in names), old
        for was, now in renamed.items():
            where, _, attr = now.rpartition(":")
            assert getattr(module, was) is getattr(importlib.import_module(where) if where else target, attr)


def test_the_readme_import_and_the_old_names_still_work():
    from teachercache.cache import Cache  # the README of release 0.1
    from teachercache.format.cache import Cache as New
    assert Cache is New
    from teachercache.student.fused_head import fused_linear_sparse_kd as fused
    from teachercache.student.losses import KDConfig as Config
    from teachercache.inspect.rows import CacheRow, iter_cache_rows
    from teachercache.kernels import KDConfig, fused_linear_sparse_kd
    from teachercache.rows import Row, iter_rows
    assert (KDConfig, fused_linear_sparse_kd, Row, iter_rows) == (Config, fused, CacheRow, iter_cache_rows)
    from teachercache.inspect import inspect_cache
    from teachercache.inspect.report import inspect_cache as report
    assert inspect_cache is report
