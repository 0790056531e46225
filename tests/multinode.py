"""Two torchrun "nodes" on one machine: two launches of ``torchrun --nnodes 2 --nproc-per-node 1`` that meet
through the c10d rendezvous on 127.0.0.1 (gloo on CPU), as two machines of a cluster would meet at the
endpoint of their first node. The c10d rendezvous gives out the ranks in the order the nodes join (it
ignores --node-rank): tests must not assume which launch holds rank 0."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two_nodes(args: list[str], logs: Path, timeout: float = 300) -> None:
    """Run ``python -m teachercache ARGS`` as a job of two nodes of one process each; AssertionError with
    each node's log tail when a node fails. ``logs``: a directory for the nodes' output."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for node in (0, 1):
        log = open(logs / f"node-{node}.log", "w")
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
             "--rdzv-id", f"teachercache-test-{port}", "--rdzv-conf", "join_timeout=120", "--local-addr",
             "127.0.0.1", "-m", "teachercache", *map(str, args)],
            env=env, stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for node, (proc, log) in enumerate(procs):
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "timeout"
        log.close()
        if code != 0:
            failed.append(f"node {node} ({code}): {(logs / f'node-{node}.log').read_text()[-3000:]}")
    for proc, _ in procs:
        if proc.poll() is None:
            proc.kill()
    assert not failed, "\n".join(failed)
