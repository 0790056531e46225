"""The package layers, checked on every import of every module (DESIGN.md §1):

    format  <-  teacher, inspect, interop  <-  student  <-  cli        (blackbox: beside, no cache)

(``student`` is the repository's student/ folder, installed as ``teachercache.student``.)

Each failure names the file, the line and the import that breaks a rule.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = {"teachercache", "teachercache.errors", "teachercache.compat"}
ALLOWED = {  # layer -> the layers its modules may import (besides the standard library and third parties)
    "teachercache": set(),              # the package itself: its version and the compat finder
    "teachercache.errors": set(),
    "teachercache.compat": set(),
    "teachercache.numerics": set(),
    "teachercache.runtime": set(),
    "teachercache.format": {"teachercache.format"},
    "teachercache.teacher": {"teachercache.format", "teachercache.teacher", "teachercache.numerics",
                             "teachercache.runtime"},
    "teachercache.inspect": {"teachercache.format", "teachercache.inspect"},
    "teachercache.interop": {"teachercache.format", "teachercache.inspect", "teachercache.interop"},
    "teachercache.blackbox": {"teachercache.blackbox", "teachercache.runtime"},
    "teachercache.student": {"teachercache.student", "teachercache.format", "teachercache.teacher",
                             "teachercache.numerics", "teachercache.runtime"},
    "teachercache.__main__": {"teachercache.cli"},
    "teachercache.cli": {"teachercache.cli", "teachercache.format", "teachercache.teacher", "teachercache.inspect",
                         "teachercache.interop", "teachercache.blackbox", "teachercache.runtime",
                         "teachercache.student"},
}
NO_TORCH = ("teachercache.format", "teachercache.errors", "teachercache.compat")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "student":   # the folder installs as teachercache.student (pyproject's package-dir)
        parts = ["teachercache"] + parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str | None:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if module == layer or (layer != "teachercache" and module.startswith(layer + ".")):
            return layer
    return None


def _imports(path: Path):
    """(line, imported module, imported names) of every import in the file, relative ones resolved."""
    package = _module_name(path).split(".") if path.name == "__init__.py" else _module_name(path).split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield node.lineno, module, [a.name for a in node.names]


def _sources():
    return sorted(p for top in ("teachercache", "student") for p in (ROOT / top).rglob("*.py"))


def test_every_import_respects_the_layers():
    broken = []
    for path in _sources():
        own = _layer(_module_name(path))
        assert own is not None, f"{path.relative_to(ROOT)}: module in no layer; add it to ALLOWED"
        for line, module, names in _imports(path):
            targets = [module] + [f"{module}.{n}" for n in names]
            if own.startswith(NO_TORCH) and (module == "torch" or module.startswith("torch.")):
                broken.append(f"{path.relative_to(ROOT)}:{line}: imports {module} ({own} imports no torch)")
            if not module.startswith("teachercache") or module in BASE:
                continue
            layer = _layer(next((t for t in reversed(targets) if _layer(t)), module))
            if layer is not None and layer != own and layer not in ALLOWED[own]:
                broken.append(f"{path.relative_to(ROOT)}:{line}: imports {module} ({own} may import "
                              f"{', '.join(sorted(ALLOWED[own])) or 'only the base modules'})")
    assert broken == []


def test_no_module_imports_a_private_name_of_another():
    found = [f"{path.relative_to(ROOT)}:{line}: from {module} import {name}"
             for path in _sources() for line, module, names in _imports(path) for name in names
             if name.startswith("_") and not name.startswith("__") and module.startswith("teachercache")]
    assert found == []


def test_the_format_loads_without_torch():
    code = ("import sys; import teachercache.format.cache, teachercache.format.codec, teachercache.errors; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('teachercache.student')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
