"""Training checkpoints: everything an exact resume needs, as safetensors + JSON (no pickle).

``OUT/checkpoints/step-N/`` holds model.safetensors, projector.safetensors (φ, when hints are used),
optimizer.safetensors (the AdamW state tensors), rng.safetensors (torch and CUDA generators) and
state.json (the loop's state: step, epoch, batches delivered in that epoch; AdamW's param groups; the
schedule; numpy's and Python's generators). A checkpoint is written under a temporary name, flushed and
renamed, so a killed run never leaves one that looks complete; ``prune_checkpoints`` keeps the newest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

CHECKPOINTS_DIR = "checkpoints"
"""Checkpoints live in OUT/checkpoints/step-N."""


def checkpoint_path(out: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` goes."""
    return Path(out) / CHECKPOINTS_DIR / f"step-{step}"


def save_checkpoint(path: Path, model, optimizer, scheduler, projector, state: dict) -> None:
    """Everything a resume needs, in a directory written under a temporary name and renamed."""
    from safetensors.torch import save_file, save_model

    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    if projector is not None:
        save_model(projector, str(tmp / "projector.safetensors"))
    opt = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.contiguous() for i, s in opt["state"].items() for k, v in s.items()
               if torch.is_tensor(v)}
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    meta = {"state": state, "param_groups": opt["param_groups"], "scheduler": scheduler.state_dict(),
            "numpy_rng": _jsonable(np.random.get_state()), "python_rng": _jsonable(random.getstate())}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _jsonable(x):
    """numpy's and Python's generator states as JSON lists."""
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    return x


def load_checkpoint(path: Path, model, optimizer, scheduler, projector) -> dict:
    """Restore model, φ, optimizer, schedule and every RNG from ``path``; returns the loop's state dict."""
    from safetensors.torch import load_file, load_model

    load_model(model, str(path / "model.safetensors"))
    if projector is not None:
        load_model(projector, str(path / "projector.safetensors"))
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    state: dict = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    np_state = meta["numpy_rng"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    py_state = meta["python_rng"]
    random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))
    return meta["state"]


def _checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints under ``out``, oldest first (a ``.partial`` directory is not one)."""
    root = Path(out) / CHECKPOINTS_DIR
    return sorted(root.glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1])) if root.is_dir() else []


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint under ``out``, or None."""
    found = _checkpoints(out)
    return found[-1] if found else None


def prune_checkpoints(out: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (``keep`` 0: delete none)."""
    found = _checkpoints(out)
    for old in found[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
