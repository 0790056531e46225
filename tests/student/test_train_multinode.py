"""`teachercache train` as a job of two torchrun nodes (tests/multinode.py: two launches of `torchrun --nnodes 2
--nproc-per-node 1` joined by the c10d rendezvous on 127.0.0.1, gloo on CPU).

The two nodes train the same weights, bit for bit, as the same job of two processes on one node
(`torchrun --nproc-per-node 2`): the ranks read the same rows and the all-reduce adds the same two
gradients. They are not bit for bit one process's weights, and no DDP run is: each rank takes the backward
pass of its half of the batch and the all-reduce adds the halves, where one process sums the whole batch's
gradient in one backward pass, in another order; the float32 results differ in their last bits, and the
optimizer carries the differences on (here every tensor differs, by up to 4e-5 after 4 steps at lr 3e-3;
Adam's first steps can turn a last-bit difference of a gradient near 0 into one of the order of lr).
Against one process the test checks the loss curve, to 1e-4 as tests/student/test_train.py does on one node.

Training from a cache in object storage under the same launch waits for the remote-storage reader
(teachercache.format's fsspec storage); these runs read a local cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from multinode import free_port, torchrun_two_nodes
from safetensors.torch import load_file

from teachercache.format.manifest import TargetSpec
from teachercache.teacher.build import BuildOptions, build_cache
from teachercache.teacher.corpus import DataOptions

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multinode") / "cache"
    build_cache(BuildOptions(teacher=str(ROOT / "data" / "teacher"), out=str(out), progress=False, batch_size=8,
                             targets=TargetSpec(kind="topk", k=16),
                             data=DataOptions(paths=(str(ROOT / "data" / "corpus" / "train.parquet"),), seq_len=64,
                                              max_docs=2)))
    return out


def _args(cache, out, batch_size: int) -> list[str]:
    """Four steps of ``batch_size`` rows a rank; unshuffled, so that the rows of a step are the same rows
    whether one process reads 4 or two ranks 2 each (row s of the stream goes to rank s mod 2)."""
    return ["train", "--cache", str(cache), "--student", "llama-tiny", "--steps", "4", "--batch-size", str(batch_size),
            "--lr", "3e-3", "--warmup-steps", "1", "--log-every", "1", "--no-shuffle", "--no-progress",
            "--out", str(out)]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_nodes_train_the_weights_of_two_processes_on_one_node(cache, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    torchrun_two_nodes(_args(cache, tmp_path / "nodes", 2), tmp_path / "logs")
    one_node = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                               str(free_port()), "-m", "teachercache", *_args(cache, tmp_path / "one-node", 2)],
                              env=env, capture_output=True, text=True)
    assert one_node.returncode == 0, one_node.stderr[-3000:]
    subprocess.run([sys.executable, "-m", "teachercache", *_args(cache, tmp_path / "one-process", 4)], env=env,
                   check=True, capture_output=True)
    nodes, same = (load_file(tmp_path / name / "model.safetensors") for name in ("nodes", "one-node"))
    assert nodes.keys() == same.keys() and len(nodes) > 5
    for name in nodes:
        assert torch.equal(nodes[name], same[name]), name
    assert _losses(tmp_path / "nodes") == _losses(tmp_path / "one-node")
    assert _losses(tmp_path / "nodes") == pytest.approx(_losses(tmp_path / "one-process"), rel=1e-4)
