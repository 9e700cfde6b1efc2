"""Bad input ends with one line naming the problem and the fix, exit code 2, nothing written."""

import json
import subprocess
import sys

import pytest

from undo.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "undo.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["pretrain", "no_such_preset"], "no config file or preset named 'no_such_preset'"),
    (["pretrain", "--set", "pretrain.stepz=3"], "unknown key 'stepz' (did you mean 'steps'?)"),
    (["pretrain", "--set", "model.preset=huge"], "unknown model preset 'huge'"),
    (["pretrain", "--set", "task.name=algebra"], "unknown task 'algebra'"),
    (["pretrain", "--set", "task.options.forget=[exponent]"], "'exponent' is not allowed"),
    (["pretrain", "--set", "pretrain.lr=fast"], "expected a number"),
    (["pretrain", "--set", "noequals"], "expected KEY=VALUE"),
    (["eval", "--model", "/nonexistent/model"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    code = main([*args, "--run-dir", str(tmp_path / "run")] if args[0] == "pretrain" else args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_malformed_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task:\n  name: arithmetic\n   options: [\n")
    assert main(["pretrain", str(bad), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "malformed YAML at line" in err and str(bad) in err


def test_model_dir_that_is_not_a_causal_lm(tmp_path, capsys):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["eval", "--model", str(tmp_path / "bert")]) == 2
    assert "causal" in capsys.readouterr().err


def test_help_and_presets_run():
    out = run_cli("--help")
    assert out.returncode == 0 and "run" in out.stdout and "unlearn" in out.stdout
    out = run_cli("presets")
    assert out.returncode == 0 and "arithmetic" in out.stdout and "tiny" in out.stdout


def test_noise_command_writes_a_loadable_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from undo.models import ModelConfig, build_model
    from undo.tokenization import train_tokenizer

    tok = train_tokenizer(["1 + 2 = 3", "4 * 5 = 20"], "bpe", 280)
    model = build_model(ModelConfig(preset="tiny"), tok, seed=0)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    assert main(["noise", "--model", str(tmp_path / "m"), "--alpha", "0.5", "--out", str(tmp_path / "noised")]) == 0
    noised = AutoModelForCausalLM.from_pretrained(tmp_path / "noised" / "model")
    AutoTokenizer.from_pretrained(tmp_path / "noised" / "model")
    w0, w1 = model.model.layers[0].mlp.down_proj.weight, noised.model.layers[0].mlp.down_proj.weight
    assert not w0.equal(w1) and (w1 - 0.5 * w0).abs().max() <= 0.5 * 0.1 * (6 / sum(w0.shape)) ** 0.5 + 1e-6


def test_attacked_models_are_named_by_their_stage(tmp_path):
    from undo.cli.common import model_label

    assert model_label(tmp_path / "run" / "undo_a0.3") == "undo_a0.3"
    assert model_label(tmp_path / "run" / "undo_a0.3" / "model") == "undo_a0.3"
    assert model_label(tmp_path / "gemma-2-2b") == "gemma-2-2b"
