"""Where a training run's metrics go besides metrics.jsonl (``--report-to``): TensorBoard or Weights & Biases.

The trainer hands each record it writes to metrics.jsonl (student.train ``after_step``) to its reporter too,
which sends every number in it as a scalar at the record's step under the same name: ``loss``, ``ce``,
``kd``, ``hint``, ``lr``, ``grad_norm``, ``positions``, ``seconds``, and an evaluation's as
``eval/perplexity``, ``eval/ece``, ... (``scalars``). Only rank 0 reports; the reporter is closed when the
run ends, with an error too.

- ``tensorboard``: event files in OUT/runs/ (``torch.utils.tensorboard.SummaryWriter``; needs
  ``pip install teachercache[tensorboard]``). A resumed run purges the steps after its checkpoint, as
  metrics.jsonl drops them, and logs them again.
- ``wandb``: ``wandb.init`` with the run's options as its config and its files in OUT/wandb/; offline unless
  WANDB_MODE or WANDB_API_KEY is set (then wandb's own settings decide); project WANDB_PROJECT, else
  "teachercache". Needs ``pip install teachercache[wandb]``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

from teachercache.student.model import TrainError
from teachercache.student.options import TrainOptions

RUNS_DIR = "runs"
"""TensorBoard's event files, in the output directory."""
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
"""--report-to -> the module it needs (its pip extra has the same name)."""


class Reporter(Protocol):
    def log(self, record: dict) -> None:
        """Send the numbers of one metrics.jsonl record (``scalars``) at its step."""

    def close(self) -> None:
        """Flush and finish; called once, at the end of the run or on an error."""


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics.jsonl record by name, a nested record's (``eval``) as ``eval/NAME``; the step
    itself, None, text and booleans are left out."""
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in value.items() if _is_number(v)})
        elif _is_number(value):
            out[key] = value
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_reporter(kind: str) -> None:
    """Refuse (TrainError) a --report-to whose package is not installed: named before anything loads."""
    module = PACKAGES.get(kind)
    if module is not None and importlib.util.find_spec(module) is None:
        raise TrainError(f"--report-to {kind} needs the {module} package, which is not installed: "
                         f"pip install 'teachercache[{module}]' (or --report-to none)")


def open_reporter(options: TrainOptions, out: Path, step: int) -> Reporter | None:
    """The reporter of ``options.report_to`` (None for none) for a run in ``out`` that starts after ``step``."""
    check_reporter(options.report_to)
    if options.report_to == "tensorboard":
        return TensorBoardReporter(out, step)
    if options.report_to == "wandb":
        return WandbReporter(out, options)
    return None


class TensorBoardReporter:
    """Scalars into event files in ``out``/runs/; a run resumed after ``step`` hides the later steps logged
    before (SummaryWriter's purge_step)."""

    def __init__(self, out: Path, step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(out) / RUNS_DIR), purge_step=step + 1 if step else None)

    def log(self, record: dict) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, global_step=record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """A wandb run in ``out``/wandb/, offline unless the environment configures wandb (module docstring)."""

    def __init__(self, out: Path, options: TrainOptions):
        import wandb

        configured = "WANDB_MODE" in os.environ or "WANDB_API_KEY" in os.environ
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "teachercache"), name=Path(out).name,
                              dir=str(out), config=asdict(options), mode=None if configured else "offline")

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()
