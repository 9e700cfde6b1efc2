"""The unlearn stage end to end on a tiny arithmetic model, its caching, frozen-model
loading, failure handling, and the `undo unlearn` / `undo methods` commands."""

import json
import os

import pytest
import torch

from undo.cli import main
from undo.config import from_dict
from undo.errors import UndoError
from undo.engine.single import pretrain, unlearn as unlearn_stage
from undo.experiment import ExperimentConfig, Recipe as MethodRun
from undo.methods import build_method
from undo.methods.idkdpo import IDK_ANSWERS
from undo.models import load_model
from undo.stages import unlearn as stage_module
from undo.stages.unlearn import build_streams, train_config
from undo.tasks import build_task
from undo.training import LossOutput

os.environ["UNDO_NO_PROGRESS"] = "1"

RAW = {"name": "tiny", "seed": 0,
       "task": {"name": "arithmetic", "options": {"examples_per_operation": 200, "eval_per_format": 10}},
       "model": {"preset": "tiny"}, "tokenizer": {"kind": "bpe", "vocab_size": 300},
       "pretrain": {"steps": 80, "batch_size": 16, "seq_len": 64, "lr": 3e-3, "warmup_steps": 10,
                    "checkpoint_every": 0}}
QUICK = {"checkpoint_every": 0, "seq_len": 64, "batch_size": 8}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a machine whose cores are shared, two threads per process thrash (measured ~50x slower evaluation).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(one_thread, tmp_path_factory):
    """A tiny model briefly pretrained on retain + forget arithmetic (the base model)."""
    exp = from_dict(ExperimentConfig, RAW)
    run_dir = tmp_path_factory.mktemp("run")
    return exp, run_dir, pretrain(exp, run_dir, "base")


@pytest.fixture
def count_loads(monkeypatch):
    calls = []

    def counting(path, *args, **kwargs):
        calls.append(str(path))
        return load_model(path, *args, **kwargs)

    monkeypatch.setattr(stage_module, "load_model", counting)
    return calls


def test_graddiff_raises_forget_ce_and_keeps_retain(base, count_loads):
    exp, run_dir, base_art = base
    run = MethodRun("graddiff", train={**QUICK, "steps": 12, "lr": 1e-3})
    art = unlearn_stage(exp, run_dir, run, base_art)
    r = art.result()
    before, after = r["metrics_before"], r["metrics"]
    # measured (length-bucketed batches, lr 1e-3): forget CE 1.296 -> 1.382, retain CE 1.396 -> 1.315
    assert after["forget_ce"] > before["forget_ce"] + 0.03
    assert after["retain_ce"] < before["retain_ce"] + 0.02
    assert after["forget_acc"] <= before["forget_acc"]
    assert r["options"]["retain_weight"] == 15.0  # the arithmetic default
    assert r["frozen_models_loaded"] == [] and count_loads == [str(base_art.model_dir)]
    assert r["steps"] == 12 and r["flops"] > 0 and (art.model_dir / "config.json").exists()
    assert not art.resume_dir.exists()

    again = unlearn_stage(exp, run_dir, run, base_art)  # cached: nothing loaded, same result
    assert again.result()["key"] == r["key"] and len(count_loads) == 1


def test_reference_is_loaded_only_when_the_loss_needs_it(base, count_loads):
    exp, run_dir, base_art = base
    art = unlearn_stage(exp, run_dir, MethodRun("graddiff", name="gd-kl", options={"retain_loss": "kl"},
                                                train={**QUICK, "steps": 2}), base_art)
    assert art.result()["frozen_models_loaded"] == ["reference"] and len(count_loads) == 2


def test_rmu_trains_only_the_chosen_down_projections(base):
    exp, run_dir, base_art = base
    art = unlearn_stage(exp, run_dir, MethodRun("rmu", options={"retain": True}, train={**QUICK, "steps": 2}), base_art)
    r = art.result()
    assert r["frozen_models_loaded"] == ["reference"]
    assert r["trainable_params"] == 2 * 512 * 128  # layers 1 and 2 of the 4-layer tiny preset
    model, _ = load_model(art.model_dir)
    original, _ = load_model(base_art.model_dir)
    changed = {n for (n, p), q in zip(model.named_parameters(), original.parameters()) if not torch.equal(p, q)}
    assert changed == {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}


def test_sam_runs_inside_the_training_loop(base):
    exp, run_dir, base_art = base
    art = unlearn_stage(exp, run_dir, MethodRun("sam", options={"base_method": "grad_ascent"},
                                                train={**QUICK, "steps": 2}), base_art)
    assert art.result()["steps"] == 2
    with pytest.raises(UndoError, match="grad_accum=1"):
        unlearn_stage(exp, run_dir, MethodRun("sam", name="sam2", train={**QUICK, "grad_accum": 2}), base_art)


def test_nan_loss_leaves_nothing_behind(base, monkeypatch):
    exp, run_dir, base_art = base
    from undo.methods.grad_ascent import GradAscent

    def nan_loss(self, model, batches):
        logits = model(input_ids=batches["forget"]["input_ids"]).logits
        return LossOutput(logits.sum() * float("nan"))

    monkeypatch.setattr(GradAscent, "loss", nan_loss)
    run = MethodRun("grad_ascent", name="diverges", train={**QUICK, "steps": 3, "checkpoint_every": 1})
    with pytest.raises(UndoError, match="loss became nan"):
        unlearn_stage(exp, run_dir, run, base_art)
    art_dir = run_dir / "unlearn" / "diverges"
    assert not art_dir.exists()
    assert not (run_dir / "unlearn" / "diverges.resume").exists()
    assert not (run_dir / "unlearn" / "diverges.partial").exists()


def test_method_needing_a_teacher_without_one_is_an_error(base):
    exp, run_dir, base_art = base
    with pytest.raises(UndoError, match="needs a teacher"):
        unlearn_stage(exp, run_dir, MethodRun("oracle_matching"), base_art)


def test_idk_rows_pair_with_forget_rows(base):
    exp, _, base_art = base
    _, tok = load_model(base_art.model_dir)
    task = build_task(exp.task, exp.seed)
    method = build_method("idkdpo")
    streams = build_streams(task, tok, method, train_config(method, QUICK, "idkdpo"), seed=0)
    forget, idk = streams["forget"].batch(3), streams["idk"].batch(3)
    for f_ids, f_lab, i_ids, i_lab in zip(forget["input_ids"], forget["labels"], idk["input_ids"], idk["labels"]):
        f_prompt = int((f_lab != -100).nonzero()[0])  # prompts are unscored (loss on completions)
        i_prompt = int((i_lab != -100).nonzero()[0])
        assert f_prompt == i_prompt and torch.equal(f_ids[:f_prompt], i_ids[:i_prompt])
        answer = tok.decode(i_ids[i_prompt:], skip_special_tokens=True).strip()
        assert answer in {a.strip() for a in IDK_ANSWERS}


def test_one_example_rows_are_bucketed_by_length(base):
    """Arithmetic rows hold one example each: batches of similar lengths carry little padding
    (random batches were ~45% padding)."""
    exp, _, base_art = base
    _, tok = load_model(base_art.model_dir)
    task = build_task(exp.task, exp.seed)
    method = build_method("graddiff")
    streams = build_streams(task, tok, method, train_config(method, QUICK, "graddiff"), seed=0)
    for stream in streams.values():
        masks = [stream.batch(k)["attention_mask"] for k in range(8)]
        assert sum(int(m.sum()) for m in masks) > 0.85 * sum(m.numel() for m in masks)


# ---------------------------------------------------------------- CLI

def test_cli_unknown_method_exits_2(base, capsys):
    _, run_dir, base_art = base
    code = main(["unlearn", "--method", "gradif", "--model", str(base_art.model_dir), "--out", str(run_dir)])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown method 'gradif'" in err and "did you mean 'graddiff'" in err and len(err.strip().splitlines()) == 1


def test_cli_missing_model_exits_2(tmp_path, capsys):
    code = main(["unlearn", "--method", "graddiff", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_cli_methods_lists_every_method(capsys):
    from undo.methods import known_methods

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in known_methods())
    # what each method needs, and a long list of auxiliary models shortened to its count and ends
    assert "update; trains old_facts" in out and "extra, forget, reference, retain" in out
    assert "trains 16 models sisa_s0_r0..sisa_s3_r3" in out and "sisa_s1_r2" not in out


def test_cli_unlearn_sweep_writes_each_run_and_picks_a_teacher(base, tmp_path, capsys):
    exp, _, base_art = base
    config = tmp_path / "exp.json"
    config.write_text(json.dumps(RAW))  # JSON is YAML
    code = main(["unlearn", "--method", "maxent", "--model", str(base_art.dir), str(config),
                 "--set", "train.steps=2", "--set", "train.seq_len=64", "--set", "train.checkpoint_every=0",
                 "--set", "method.retain_weight=2", "--sweep", "lr=1e-5,1e-3", "--out", str(tmp_path / "out")])
    assert code == 0
    out = capsys.readouterr().out
    for name in ("maxent-lr=1e-05", "maxent-lr=0.001"):
        result = json.loads((tmp_path / "out" / "unlearn" / name / "result.json").read_text())
        assert result["options"]["retain_weight"] == 2.0 and result["train"]["steps"] == 2
        assert name in out
    assert "strongest forgetting" in out or "no teacher" in out


def test_task_vector_raises_forget_ce_and_a_resumed_run_negates_from_the_starting_weights(base, monkeypatch):
    """The start/finish hooks through the stage: the snapshot is of the starting weights even
    when training resumes from a later point, so an interrupted run ends where an
    uninterrupted one does."""
    from undo.methods.task_vector import TaskVector

    exp, run_dir, base_art = base
    train = {**QUICK, "steps": 8, "lr": 1e-3, "checkpoint_every": 4}
    straight = unlearn_stage(exp, run_dir, MethodRun("task_vector", name="tv", train=train), base_art).result()
    assert straight["metrics"]["forget_ce"] > straight["metrics_before"]["forget_ce"] + 0.05

    calls, plain_loss = [], TaskVector.loss

    def interrupted(self, model, batches):
        calls.append(1)
        if len(calls) == 7:  # step 6 of 8: the last resume point is step 4
            raise KeyboardInterrupt
        return plain_loss(self, model, batches)

    monkeypatch.setattr(TaskVector, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        unlearn_stage(exp, run_dir, MethodRun("task_vector", name="tv2", train=train), base_art)
    calls.clear()
    monkeypatch.setattr(TaskVector, "loss", lambda self, model, batches: calls.append(1) or plain_loss(self, model, batches))
    resumed = unlearn_stage(exp, run_dir, MethodRun("task_vector", name="tv2", train=train), base_art).result()
    assert len(calls) == 4                           # it resumed from step 4 ...
    assert resumed["metrics"] == straight["metrics"]  # ... and negated the change from the starting weights
    a, _ = load_model(run_dir / "unlearn" / "tv" / "model")
    b, _ = load_model(run_dir / "unlearn" / "tv2" / "model")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
