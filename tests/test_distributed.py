"""Data parallelism: the same training run on 2 processes (torchrun, gloo on CPU) ends
with the weights of a 1-process run, because the loop shards each global batch by process
and DDP averages the gradients; a whole stage under torchrun writes its artifact once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "fixtures" / "ddp_train.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], timeout: float = 180) -> str:
    """Run a command with one thread per process; its stdout."""
    env = {**os.environ, "UNDO_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    run([sys.executable, str(SCRIPT), str(out)])
    return out


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
@pytest.mark.parametrize("resumed", [False, True], ids=["straight", "resumed"])
def test_two_processes_match_one(tmp_path, one_process_run, sharding, resumed):
    run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(SCRIPT), str(tmp_path / "two"),
         *(["fsdp"] if sharding == "fsdp" else []), *(["resume"] if resumed else [])])
    one = json.loads((one_process_run / "run.json").read_text())
    two = json.loads((tmp_path / "two" / "run.json").read_text())
    assert (one["world"], two["world"]) == (1, 2)   # the 2-process run really formed a group
    assert one["tokens"] == two["tokens"] == 6 * 8 * 16 and one["steps"] == two["steps"] == 6
    assert one["max_weight_change"] > 1e-2           # training moved the weights ...
    a = load_file(str(one_process_run / "weights.safetensors"))
    b = load_file(str(tmp_path / "two" / "weights.safetensors"))  # FSDP: gathered from both shards
    assert a.keys() == b.keys()
    for key in a:                                    # ... to the same place, up to float summation order
        assert torch.allclose(a[key], b[key], atol=2e-5, rtol=0), (key, (a[key] - b[key]).abs().max().item())


FSDP_CLI = Path(__file__).parent / "fixtures" / "fsdp_cli.py"
SETTINGS = ["--set", "train.steps=6", "--set", "train.batch_size=8", "--set", "train.seq_len=64",
            "--set", "train.lr=3e-3", "--set", "train.eval_every=3", "--set", "train.checkpoint_every=2"]
STAGES = {  # command, where its artifact lands
    "graddiff": (["unlearn", "--method", "graddiff", "--set", "method.retain_loss=kl", *SETTINGS], "unlearn/graddiff"),
    "rmu": (["unlearn", "--method", "rmu", "--set", "method.retain=true", *SETTINGS], "unlearn/rmu"),
    "distill": (["distill", "--alpha", "0.5", "--set", "undo.stop_rule=none",
                 *(a.replace("train.", "undo.distill.") for a in SETTINGS)], "undo_a0.5"),
}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from undo.config import from_dict
    from undo.experiment import ExperimentConfig
    from undo.engine.single import pretrain

    tmp = tmp_path_factory.mktemp("base")
    raw = {"name": "ddp", "seed": 0,
           "task": {"name": "arithmetic", "options": {"examples_per_operation": 60, "eval_per_format": 6}},
           "model": {"preset": "tiny"}, "tokenizer": {"kind": "bpe", "vocab_size": 300},
           "pretrain": {"steps": 30, "batch_size": 16, "seq_len": 64, "lr": 3e-3, "checkpoint_every": 0}}
    (tmp / "exp.json").write_text(json.dumps(raw))
    return tmp / "exp.json", pretrain(from_dict(ExperimentConfig, raw), tmp / "run", "base")


@pytest.mark.parametrize("sharding,stage", [("ddp", "graddiff"), ("fsdp", "graddiff"), ("fsdp", "rmu"),
                                            ("fsdp", "distill")])
def test_two_process_stage_equals_one_process_with_accumulation(tmp_path, tiny_base, sharding, stage):
    """A whole stage under torchrun: 2 processes x accumulation 1 split each global batch into
    the same micro-batches as 1 process x accumulation 2 (padded rows of different lengths,
    answer-only loss, retain streams, frozen reference/teacher models replicated on each
    process, resume points every 2 steps, distillation's warmup + cosine schedule), so both
    runs end with the same weights and metrics; the artifact is written once and the
    stage's table printed once. FSDP shards the trained model with FSDP2 (forced on CPU,
    see fixtures/fsdp_cli.py)."""
    config, base = tiny_base
    command, where = STAGES[stage]
    model_flag = ["--teacher" if stage == "distill" else "--model", str(base.dir)]
    args = [*command, *model_flag, str(config)]
    accum = "undo.distill.grad_accum" if stage == "distill" else "train.grad_accum"
    one_out = run([sys.executable, "-m", "undo.cli", *args, "--set", f"{accum}=2", "--run-dir", str(tmp_path / "one")])
    launcher = [str(FSDP_CLI)] if sharding == "fsdp" else ["-m", "undo.cli"]
    two_out = run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                   *launcher, *args, "--set", f"{accum}=1", "--run-dir", str(tmp_path / "two")])
    one = json.loads((tmp_path / "one" / where / "result.json").read_text())
    two = json.loads((tmp_path / "two" / where / "result.json").read_text())
    assert one.get("frozen_models_loaded") == two.get("frozen_models_loaded")
    assert one["tokens"] == two["tokens"] and one["steps"] == two["steps"] == 6
    assert [h["step"] for h in one["history"]] == [h["step"] for h in two["history"]] == [0, 3, 6]
    for key, value in one["metrics"].items():
        assert abs(value - two["metrics"][key]) < 1e-4, (key, value, two["metrics"][key])
    a = load_file(str(tmp_path / "one" / where / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / where / "model" / "model.safetensors"))
    before = load_file(str(base.model_dir / "model.safetensors"))
    assert a.keys() == b.keys()                       # a tied head saved once in both
    assert max((a[k] - before[k]).abs().max().item() for k in a) > 1e-3   # the stage moved the weights
    for key in a:
        assert torch.allclose(a[key], b[key], atol=2e-5, rtol=0), (key, (a[key] - b[key]).abs().max().item())
    assert not list((tmp_path / "two").rglob("*.partial")) and not list((tmp_path / "two").rglob("*.resume"))
    path_line = [line for line in two_out.splitlines() if "model" in line and str(tmp_path / "two") in line]
    assert len(path_line) == 1, two_out           # printed by the main process only
    assert len([line for line in one_out.splitlines() if "model" in line and str(tmp_path / "one") in line]) == 1


def test_a_launch_that_does_not_match_the_machine_is_one_line(monkeypatch, capsys):
    from undo import distributed
    from undo.cli import main
    from undo.errors import UndoError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    try:
        distributed.check_devices()
        raise AssertionError("4 processes on a 1-GPU node were accepted")
    except UndoError as e:
        assert "4 processes" in str(e) and "--num_processes 1" in str(e)
    monkeypatch.undo()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["presets"]) == 2   # refused before any process group is formed
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FSDP" in err[0] and "GPU" in err[0]
