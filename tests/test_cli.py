"""Bad input ends with one line naming the problem and the fix, exit code 2, nothing written."""

import errno
import json
import os
import subprocess
import sys

import pytest

from undo.cli import build_parser, main

# Fast settings of the `quick` preset for the commands below that train or evaluate.
SMALL = ["--set", "task.options.examples_per_operation=20", "--set", "task.options.eval_per_format=2",
         "--set", "task.options.quick_eval_per_format=1"]


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
    (["pretrain", "--set", "task.options.forget=[]"], "forget and retain each need at least one operation"),
    (["pretrain", "--set", "pretrain.seq_len=0"], "config.pretrain.seq_len must be at least 2, got 0"),
    (["pretrain", "--set", "undo.distill.seq_len=-4"], "config.undo.distill.seq_len must be at least 2, got -4"),
    (["pretrain", "--set", "task.options.eval_per_format=0"], "eval_per_format must be at least 1, got 0"),
    (["pretrain", "--set", "tokenizer.vocab_size=100"], "tokenizer.vocab_size 100 is below the 260 tokens"),
    (["pretrain", "--set", "tokenizer.vocab_size=-1"], "tokenizer.vocab_size -1 is below the 260 tokens"),
    (["pretrain", "--set", "attacks.0.options.steps=0"], "config.attacks[0].options.steps must be at least 1, got 0"),
    (["pretrain", "--set", "attacks.0.options.seq_len=0"], "options.seq_len must be at least 2, got 0"),
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
    # each preset with the first sentence of its header comment ("et al. 2023" does not end it)
    assert "quick               The arithmetic pipeline at toy scale: every stage runs" in out.stdout
    assert "FairSISA (Kadhe et al. 2023) over 3 seeds" in out.stdout


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


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama + tokenizer saved as a plain HF checkpoint directory."""
    from undo.models import ModelConfig, build_model
    from undo.tokenization import train_tokenizer

    path = tmp_path_factory.mktemp("tiny") / "m"
    tok = train_tokenizer(["1 + 2 = 3", "4 * 5 = 20"], "bpe", 280)
    model = build_model(ModelConfig(preset="tiny"), tok, seed=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def leftovers(folder):
    """Temporary files and directories a failed write must not leave behind."""
    return sorted(str(p) for p in folder.rglob("*") if p.name.endswith((".partial", ".tmp", ".old", ".resume")))


def fake_sidecar(folder, **fields):
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"stage": folder.name, "key": "0123456789abcdef", **fields}))
    (folder / "model").mkdir()
    (folder / "model" / "weights.bin").write_text("someone's weights")


# ---------------------------------------------------------------- nothing written over what undo did not write


def test_noise_refuses_a_non_empty_out_unless_forced(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["noise", "--model", str(tiny_dir), "--alpha", "0.5", "--out", str(out)]
    assert main(args) == 2
    err = one_line_error(capsys)
    assert f"--out {out} exists and is not empty" in err and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and not leftovers(tmp_path)
    assert main([*args, "--force"]) == 0
    assert (out / "model" / "config.json").exists() and not (out / "notes.txt").exists()
    assert main(args) == 0  # the same noise again (same key): cached, no --force needed
    args[4] = "0.3"  # another noise into the same directory: refused too
    assert main(args) == 2 and "exists and is not empty" in one_line_error(capsys)
    assert json.loads((out / "result.json").read_text())["alpha"] == 0.5


def test_noise_refuses_another_stages_artifact_as_out(tiny_dir, tmp_path, capsys):
    out = tmp_path / "unlearn" / "rmu"
    fake_sidecar(out, kind="unlearn")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["noise", "--model", str(tiny_dir), "--alpha", "0.5", "--out", str(out)]) == 2
    assert f"--out {out} exists and is not empty" in one_line_error(capsys)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before and not leftovers(tmp_path)


def test_noise_out_that_is_a_file_is_an_error(tiny_dir, tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    for force in ([], ["--force"]):
        assert main(["noise", "--model", str(tiny_dir), "--alpha", "0.5", "--out", str(tmp_path / "out"), *force]) == 2
        assert "is a file" in one_line_error(capsys) and (tmp_path / "out").read_text() == "a file"


def _files(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("mine, message", [
    (lambda d: (d.mkdir(parents=True), (d / "thesis.tex").write_text("years of work")),
     "exists and holds files undo did not write"),
    (lambda d: fake_sidecar(d, kind="unlearn"), "holds the artifact of another kind of stage (unlearn, not distill)"),
])
def test_distill_never_replaces_a_directory_undo_did_not_write_for_it(tiny_dir, tmp_path, capsys, mine, message):
    run = tmp_path / "run"
    mine(run / "mine")
    before = _files(run / "mine")
    assert main(["distill", "--teacher", str(tiny_dir), "--name", "mine", "quick", "--run-dir", str(run), *SMALL]) == 2
    assert f"{run / 'mine'} {message}" in one_line_error(capsys)
    assert _files(run / "mine") == before and not leftovers(tmp_path)


def test_unlearn_never_replaces_a_directory_undo_did_not_write(tiny_dir, tmp_path, capsys):
    stage = tmp_path / "run" / "unlearn" / "graddiff"
    stage.mkdir(parents=True)
    (stage / "thesis.tex").write_text("years of work")
    assert main(["unlearn", "--method", "graddiff", "--model", str(tiny_dir), "quick",
                 "--out", str(tmp_path / "run"), *SMALL]) == 2
    assert f"{stage} exists and holds files undo did not write" in one_line_error(capsys)
    assert _files(stage) == {stage / "thesis.tex": b"years of work"} and not leftovers(tmp_path)


# ---------------------------------------------------------------- write failures


def test_a_file_where_the_run_directory_should_be_is_one_line(tiny_dir, tmp_path, capsys):
    blocker = tmp_path / "run"
    blocker.write_text("not a directory")
    assert main(["unlearn", "--method", "graddiff", "--model", str(tiny_dir), "quick", "--out", str(blocker), *SMALL]) == 2
    assert "cannot write" in one_line_error(capsys)
    assert main(["noise", "--model", str(tiny_dir), "--alpha", "0.5", "--out", str(blocker / "noised")]) == 2
    assert "cannot write" in one_line_error(capsys)
    assert main(["run", "quick", "--run-dir", str(blocker)]) == 2
    assert f"cannot write {blocker}" in one_line_error(capsys)
    assert blocker.read_text() == "not a directory" and not leftovers(tmp_path)


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),  # torch.save, disk full
])
def test_disk_full_while_writing_an_artifact_leaves_nothing_behind(tiny_dir, tmp_path, capsys, monkeypatch, error):
    from transformers import PreTrainedModel

    def full_disk(self, path, **kw):
        os.makedirs(path, exist_ok=True)
        open(os.path.join(path, "model.safetensors"), "w").write("half")
        raise error

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    assert main(["noise", "--model", str(tiny_dir), "--alpha", "0.5", "--out", str(tmp_path / "noised")]) == 2
    err = one_line_error(capsys)
    assert f"cannot write {tmp_path / 'noised'}" in err and "free disk space" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_report_write_failures_are_one_line_and_leave_no_temporary_files(tmp_path, capsys, monkeypatch):
    from undo import report
    from undo.store import ResultStore

    run = tmp_path / "run"
    ResultStore(run / "results.sqlite")
    (run / "task.json").write_text(json.dumps({"name": "arithmetic", "forget_metric": "forget_acc",
                                               "retain_metric": "retain_acc", "higher_is_better": True}))
    (run / "report").write_text("a file where the report directory goes")
    assert main(["report", str(run)]) == 2
    assert f"cannot write {run / 'report'}" in one_line_error(capsys)
    (run / "report").unlink()

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report.os, "replace", full_disk)
    assert main(["report", str(run)]) == 2
    assert "No space left on device" in one_line_error(capsys)
    assert list((run / "report").iterdir()) == []


# ---------------------------------------------------------------- damaged files given to a command


@pytest.mark.parametrize("text", ['{"name": "arithm', "3", "{}", "\udcff"])
def test_report_of_a_corrupt_task_json(tmp_path, capsys, text):
    from undo.store import ResultStore

    ResultStore(tmp_path / "results.sqlite")
    (tmp_path / "task.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    assert main(["report", str(tmp_path)]) == 2
    assert "task.json is corrupt" in one_line_error(capsys)
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("command", [["eval"], ["unlearn", "--method", "graddiff"]])
@pytest.mark.parametrize("text", ['{"stage": "unlearn/rmu", "ke', "[1, 2]"])
def test_a_stage_directory_with_a_corrupt_result_json(tiny_dir, tmp_path, capsys, command, text):
    import shutil

    stage = tmp_path / "unlearn" / "rmu"
    shutil.copytree(tiny_dir, stage / "model")
    (stage / "result.json").write_text(text)
    assert main([*command, "--model", str(stage), "quick", "--run-dir", str(tmp_path / "run")]) == 2
    assert f"{stage / 'result.json'} is corrupt" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_an_empty_training_split_stops_undo_run_before_any_stage(tmp_path, capsys):
    from toy_plugins import ToyTask
    from undo.tasks import register_task

    register_task("toy", ToyTask)
    config = tmp_path / "toy.yaml"
    config.write_text("name: toy\ntask: {name: toy, options: {examples: 0}}\n")
    assert main(["run", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    assert "the forget split has no training examples" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_a_char_vocabulary_too_small_for_the_task_stops_before_training(tmp_path, capsys):
    assert main(["pretrain", "quick", "--which", "base", "--set", "tokenizer.kind=char",
                 "--set", "tokenizer.vocab_size=12", "--run-dir", str(tmp_path / "run"), *SMALL]) == 2
    assert "tokenizer.vocab_size 12 is below the" in one_line_error(capsys)
    assert not leftovers(tmp_path) and not list((tmp_path / "run").rglob("*.json"))


# ---------------------------------------------------------------- the command line itself


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`undo methods | head -1`: the pipe closes before undo writes (buffered output, as in a terminal
    session without PYTHONUNBUFFERED); undo ends quietly with exit code 0."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, "-m", "undo.cli", "methods"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err


@pytest.mark.parametrize("argv", [
    ["attack", "relearn", "--model", "B", "quick"],          # the README's order
    ["attack", "relearn", "quick", "--model", "B"],
    ["attack", "--model", "B", "relearn", "quick"],
])
def test_positionals_may_follow_options(argv):
    args = build_parser().parse_args(argv)
    assert (args.kind, args.model, args.config) == ("relearn", "B", "quick")


def test_unknown_arguments_are_still_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["attack", "relearn", "--model", "B", "quick", "extra"])
    assert e.value.code == 2 and "unrecognized arguments: extra" in capsys.readouterr().err


def test_distill_into_a_given_student_without_a_name(tiny_dir, tmp_path, capsys):
    assert main(["distill", "--teacher", str(tiny_dir), "--student-model", str(tiny_dir), "quick",
                 "--run-dir", str(tmp_path), "--set", "undo.distill.steps=1", *SMALL]) == 0
    assert (tmp_path / "distill_m" / "model" / "config.json").exists()
    assert json.loads((tmp_path / "distill_m" / "result.json").read_text())["student"] == "model"


def test_paths_with_a_tilde_are_expanded(tiny_dir, tmp_path, monkeypatch, capsys):
    import shutil

    from undo.experiment import load_experiment
    from undo.tasks import build_task

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_dir, tmp_path / "m")
    (tmp_path / "exp.yaml").write_text("name: tilde\nmodel: {path: ~/m}\ntokenizer: {path: ~/m}\n"
                                       "models: {base: {path: ~/m}}\n")
    for name in ("en.txt", "ko.txt"):
        (tmp_path / name).write_text("one doc\nanother doc\nthird doc\n")
    exp = load_experiment("~/exp.yaml", ["task.name=language", "task.options.source=files",
                                         "task.options.retain_files=[~/en.txt]", "task.options.forget_files=[~/ko.txt]"])
    assert exp.model.path == exp.tokenizer.path == exp.models["base"].path == str(tmp_path / "m")
    task = build_task(exp.task, 0)
    assert task.options.retain_files == [str(tmp_path / "en.txt")] and task.train_texts("retain")
    assert main(["noise", "--model", "~/m", "--alpha", "0.5", "--out", "~/noised"]) == 0
    assert (tmp_path / "noised" / "model" / "config.json").exists()
    assert main(["plan", "~/exp.yaml", "--run-dir", "~/run"]) == 0


def test_eval_takes_a_stage_directory(tiny_dir, tmp_path, capsys):
    """`undo eval --model runs/x/seed0/unlearn/rmu`: a stage's directory, not its model/, is evaluated."""
    assert main(["noise", "--model", str(tiny_dir), "--alpha", "0.0", "--out", str(tmp_path / "unlearn" / "rmu")]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "unlearn" / "rmu"), "quick", "--json", *SMALL]) == 0
    by_stage = json.loads(capsys.readouterr().out)
    assert main(["eval", "--model", str(tiny_dir), "quick", "--json", *SMALL]) == 0
    assert by_stage == json.loads(capsys.readouterr().out)  # alpha 0: the same weights


@pytest.mark.parametrize("preset", ["arithmetic-attacks", "language-attacks", "privacy", "facts", "facts-update", "facts-robust",
                                    "bias-quick", "bias", "toxicity-quick", "toxicity", "fair-quick", "fair"])
def test_every_attack_and_method_preset_builds_its_graph(preset):
    """The presets name only registered methods and attacks with valid options, and every
    method and attack of the file gets its stages."""
    from undo.engine.graph import build_graph
    from undo.experiment import load_experiment, preset_names

    assert preset in preset_names()
    exp = load_experiment(preset)
    ids = list(build_graph(exp).nodes)
    for spec in exp.unlearn.methods:
        assert f"seed0/unlearn/{spec.label}" in ids
    for attack in exp.attacks:
        assert any(i.startswith(f"seed0/attack/{attack.name}/") for i in ids)
