"""Data parallelism: the same training run on 2 processes (torchrun, gloo on CPU) ends
with the weights of a 1-process run, because the loop shards each global batch by process
and DDP averages the gradients."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "fixtures" / "ddp_train.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], timeout: float = 120) -> None:
    env = {**os.environ, "UNDO_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_two_processes_match_one(tmp_path):
    run([sys.executable, str(SCRIPT), str(tmp_path / "one")])
    run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(SCRIPT), str(tmp_path / "two")])
    one = json.loads((tmp_path / "one" / "run.json").read_text())
    two = json.loads((tmp_path / "two" / "run.json").read_text())
    assert (one["world"], two["world"]) == (1, 2)   # the 2-process run really formed a group
    assert one["tokens"] == two["tokens"] == 4 * 8 * 16 and one["steps"] == two["steps"] == 4
    assert one["max_weight_change"] > 1e-2           # training moved the weights ...
    a = load_file(str(tmp_path / "one" / "weights.safetensors"))
    b = load_file(str(tmp_path / "two" / "weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:                                    # ... to the same place, up to float summation order
        assert torch.allclose(a[key], b[key], atol=2e-5, rtol=0), (key, (a[key] - b[key]).abs().max().item())
