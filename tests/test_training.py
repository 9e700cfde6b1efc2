import math

import pytest
import torch

from undo.data import BatchStream, pad_batch
from undo.errors import UndoError
from undo.models import ModelConfig, build_model
from undo.tasks.arithmetic import ArithmeticOptions, ArithmeticTask
from undo.tokenization import train_tokenizer
from undo.training import LossOutput, TrainConfig, lm_loss, lr_lambda, train


@pytest.fixture(scope="module")
def setup():
    task = ArithmeticTask(ArithmeticOptions(examples_per_operation=100, eval_per_format=4), seed=0)
    tok = train_tokenizer(task.tokenizer_corpus(), "bpe", 300)
    rows = pad_batch(tok, task.train_examples("retain"), "completion")
    return tok, rows


def _train(tok, rows, steps, resume_dir=None, **kw):
    model = build_model(ModelConfig(preset="tiny"), tok, seed=0)
    cfg = TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=2, checkpoint_every=kw.pop("checkpoint_every", 0),
                      eval_every=kw.pop("eval_every", 0))
    result = train(model, lm_loss, {"train": BatchStream(rows, 8, seed=0)}, cfg, seed=0, resume_dir=resume_dir, **kw)
    return model, result


def test_a_few_steps_lower_the_loss(setup):
    tok, rows = setup
    model = build_model(ModelConfig(preset="tiny"), tok, seed=0)
    batch = {k: v[:32] for k, v in rows.items()}
    before = lm_loss(model, {"b": batch}).loss.item()
    train(model, lm_loss, {"train": BatchStream(rows, 8, seed=0)}, TrainConfig(steps=30, batch_size=8, lr=3e-3),
          seed=0)
    after = lm_loss(model, {"b": batch}).loss.item()
    assert after < before - 0.5, (before, after)


def test_same_seed_same_weights(setup):
    tok, rows = setup
    a, ra = _train(tok, rows, 6)
    b, rb = _train(tok, rows, 6)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert ra.flops == rb.flops > 0


class Crash(Exception):
    pass


def test_resume_equals_uninterrupted(setup, tmp_path):
    """Kill a run after a resume point; rerunning ends with bitwise the same weights."""
    tok, rows = setup
    full, full_result = _train(tok, rows, 10)

    calls = {"n": 0}

    def crashing_eval(model):
        calls["n"] += 1
        if calls["n"] == 2:  # at step 8, after the resume point at step 6 was written
            raise Crash()
        return {"x": 0.0}

    resume = tmp_path / "resume"
    with pytest.raises(Crash):
        _train(tok, rows, 10, resume_dir=resume, checkpoint_every=3, eval_every=4, evaluate=crashing_eval)
    assert (resume / "state.json").exists()
    resumed, result = _train(tok, rows, 10, resume_dir=resume, checkpoint_every=3)
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), resumed.parameters()))
    assert result.steps == 10 and result.flops == full_result.flops and result.tokens == full_result.tokens


def test_nan_loss_is_a_clear_error(setup):
    tok, rows = setup

    def nan_loss(model, batches):
        out = lm_loss(model, batches)
        return LossOutput(out.loss * float("nan"))

    model = build_model(ModelConfig(preset="tiny"), tok, seed=0)
    with pytest.raises(UndoError, match="loss became nan at step 0; lower the learning rate"):
        train(model, nan_loss, {"train": BatchStream(rows, 8, seed=0)}, TrainConfig(steps=3, batch_size=8), seed=0)


def test_grad_accumulation_matches_full_batch(setup):
    tok, rows = setup
    models = []
    for accum in (1, 4):
        model = build_model(ModelConfig(preset="tiny"), tok, seed=0)
        # equal-length rows so per-micro-batch means average to the full-batch mean
        fixed = {k: v[:, :8] for k, v in rows.items()}
        fixed["attention_mask"] = torch.ones_like(fixed["attention_mask"])
        fixed["labels"] = fixed["input_ids"].clone()
        train(model, lm_loss, {"train": BatchStream(fixed, 8, seed=0)},
              TrainConfig(steps=3, batch_size=8, grad_accum=accum, lr=1e-3), seed=0)
        models.append(model)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(p, q, atol=1e-5)


def test_each_step_builds_its_batch_once_whatever_the_accumulation(setup, monkeypatch):
    """The micro-batches of a step are slices of one batch, not grad_accum rebuilt copies; they
    are the batch's rows in order."""
    tok, rows = setup
    built, seen = [], []
    real_batch = BatchStream.batch
    monkeypatch.setattr(BatchStream, "batch", lambda self, step: built.append(step) or real_batch(self, step))

    def loss(model, batches):
        seen.append(batches["train"]["input_ids"])
        return lm_loss(model, batches)

    model = build_model(ModelConfig(preset="tiny"), tok, seed=0)
    stream = BatchStream(rows, 8, seed=0)
    train(model, loss, {"train": stream}, TrainConfig(steps=3, batch_size=8, grad_accum=4, checkpoint_every=0), seed=0)
    assert built == [0, 1, 2]
    for step in range(3):
        assert torch.equal(torch.cat(seen[4 * step:4 * step + 4]), real_batch(stream, step)["input_ids"])


def test_schedule_shapes():
    cos = lr_lambda(TrainConfig(steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1))
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0) and cos(100) == pytest.approx(0.1)
    assert cos(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    const = lr_lambda(TrainConfig(steps=100, warmup_steps=1, schedule="constant"))
    assert const(0) == 1.0 and const(50) == 1.0


def test_flops_are_six_n_tokens(setup):
    from undo.models import non_embedding_params

    tok, rows = setup
    model, result = _train(tok, rows, 2)
    assert result.flops == pytest.approx(6 * non_embedding_params(model) * result.tokens)


def test_frozen_weights_get_no_weight_gradient_flops(setup):
    """With only the MLP down-projections trained, a token costs 2N forward + 2N backward
    through the activations + 2 x (the trained parameters) of weight gradients, not 6N."""
    from undo.models import non_embedding_params

    tok, rows = setup
    model = build_model(ModelConfig(preset="tiny"), tok, seed=0)
    for name, p in model.named_parameters():
        p.requires_grad_("down_proj" in name)
    trained = sum(p.numel() for name, p in model.named_parameters() if "down_proj" in name)
    cfg = TrainConfig(steps=2, batch_size=8, lr=3e-3, warmup_steps=0, checkpoint_every=0)
    result = train(model, lm_loss, {"train": BatchStream(rows, 8, seed=0)}, cfg, seed=0)
    n = non_embedding_params(model)
    assert non_embedding_params(model, trainable_only=True) == trained
    assert result.flops == pytest.approx((4 * n + 2 * trained) * result.tokens)
    assert result.flops < 6 * n * result.tokens


def test_a_loss_that_knows_its_cost_replaces_six_n_tokens(setup):
    # Methods whose forward stops early (RMU) report their own cost; frozen forwards add on top.
    tok, rows = setup

    def priced(model, batches):
        return LossOutput(lm_loss(model, batches).loss, train_flops=1000.0, extra_flops=7.0)

    model = build_model(ModelConfig(preset="tiny"), tok, seed=0)
    result = train(model, priced, {"train": BatchStream(rows, 8, seed=0)},
                   TrainConfig(steps=3, batch_size=8, grad_accum=2, checkpoint_every=0), seed=0)
    assert result.flops == 3 * 2 * (1000.0 + 7.0)


def test_a_failed_resume_point_write_is_one_error_and_leaves_no_temporary_directory(setup, tmp_path, monkeypatch):
    import errno

    from undo import training

    tok, rows = setup

    def full_disk(obj, path, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training.torch, "save", full_disk)  # the RNG state, after accelerate wrote the weights
    resume = tmp_path / "stage.resume" / "k"
    with pytest.raises(UndoError, match=r"cannot write .*stage.resume/k \(No space left on device\); free disk space"):
        _train(tok, rows, 4, resume_dir=resume, checkpoint_every=2)
    assert sorted(p.name for p in resume.parent.iterdir()) == []  # no k.tmp, no half-written resume point


def test_seq_len_below_two_is_rejected_at_config_load():
    from undo.config import from_dict

    for seq_len in (1, 0, -3):
        with pytest.raises(UndoError, match=rf"pretrain.seq_len must be at least 2, got {seq_len}"):
            from_dict(TrainConfig, {"seq_len": seq_len}, "pretrain")
