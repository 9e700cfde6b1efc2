"""Every stage (finetune, unlearn, noise + distill, relearning attack, eval) on Llama, Gemma-2,
Qwen2 and GPT-2 checkpoints loaded from a local directory, GPT-2 with its pad-less tokenizer."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from test_arch import arch_configs, gpt2_style_tokenizer
from undo.engine.single import attack, distill, pretrain, unlearn
from undo.experiment import Recipe, load_experiment
from undo.stages.evaluate import evaluate_model
from undo.tasks import build_task
from undo.tokenization import train_tokenizer


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen2", "gpt2"])
def test_every_stage_runs_on_a_local_checkpoint(arch, tmp_path):
    overrides = ["task.options.examples_per_operation=40", "task.options.eval_per_format=4",
                 "task.options.quick_eval_per_format=2", "pretrain.steps=3", "pretrain.batch_size=8"]
    exp = load_experiment("quick", overrides)
    task = build_task(exp.task, exp.seed)
    tok = gpt2_style_tokenizer() if arch == "gpt2" else train_tokenizer(task.tokenizer_corpus(), "bpe", 300)
    config = arch_configs(len(tok))[arch]
    config.max_position_embeddings = config.n_positions = 128
    config.pad_token_id, config.bos_token_id, config.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(0)
    source = tmp_path / "source"
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    tok.save_pretrained(source)
    exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, path=str(source)))
    run = tmp_path / "run"

    base = pretrain(exp, run, "base")  # finetuning an existing checkpoint
    unlearned = unlearn(exp, run, Recipe("graddiff", options={"retain_loss": "kl"},
                                         train={"steps": 2, "batch_size": 4}), base)
    assert unlearned.result()["frozen_models_loaded"] == ["reference"]
    undo_cfg = dataclasses.replace(exp.undo, distill=dataclasses.replace(exp.undo.distill, steps=2, batch_size=4,
                                                                         eval_every=1))
    distilled = distill(dataclasses.replace(exp, undo=undo_cfg), run, "undo", unlearned, "noised", alpha=0.5)
    arts = attack(exp, run, "undo", distilled, "relearn",
                  {"lrs": [1e-3], "steps": 2, "eval_every": 1, "batch_size": 4})
    assert [p["step"] for p in arts[0].result()["curve"]] == [0, 1, 2]

    for art in (base, unlearned, distilled):
        model = AutoModelForCausalLM.from_pretrained(art.model_dir)
        assert model.config.model_type == config.model_type
        assert AutoTokenizer.from_pretrained(art.model_dir).pad_token is not None
    metrics = evaluate_model(str(distilled.model_dir), exp)
    assert {"forget_acc", "retain_acc", "forget_ce", "retain_ce"} <= set(metrics)
