"""The attacks beyond full relearning (issue 13): each does what it claims on a tiny model, and
all of them run as stages of an experiment, land in the store and in the report's matrix."""

import copy

import pytest
import torch

from undo.attacks import build_attack, known_attacks
from undo.attacks.fewshot import fewshot_groups, separator
from undo.attacks.heldout_relearn import halves
from undo.attacks.quantize import dequantized_weight, quantize_weights, quantized_layers
from undo.attacks.relearn import attack_examples
from undo.attacks.relearn_lora import LoraAttackConfig, with_lora
from undo.attacks.relearn import finetune
from undo.config import from_dict
from undo.errors import UndoError
from undo.experiment import ExperimentConfig
from undo.models import ModelConfig, build_model, load_model
from undo.tasks.arithmetic import ArithmeticOptions, ArithmeticTask, operand_pairs, same_fact
from undo.tasks import build_task
from undo.tasks.base import Example
from undo.tasks.language import LanguageOptions, LanguageTask
from undo.tokenization import train_tokenizer


def arithmetic(**options):
    return ArithmeticTask(ArithmeticOptions(**{"examples_per_operation": 200, "eval_per_format": 6,
                                               "quick_eval_per_format": 3, "max_operand": {"multiplication": 10, "division": 10}, **options}),
                          seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama and the arithmetic tokenizer, saved as a checkpoint."""
    task = arithmetic()
    tok = train_tokenizer(task.tokenizer_corpus(), "bpe", 300)
    path = tmp_path_factory.mktemp("tiny") / "model"
    build_model(ModelConfig(preset="tiny"), tok, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_every_attack_of_this_suite_is_registered():
    assert {"relearn", "relearn_lora", "heldout_relearn", "quantize", "fewshot"} <= set(known_attacks())


# ---------------------------------------------------------------- quantize

def rtn(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Round-to-nearest by hand: symmetric, one scale per group of `group` input weights,
    scale = max|w| / ((qmax - qmin) / 2), q = clamp(round(w / scale), qmin, qmax)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    g = w.reshape(w.shape[0], -1, group)
    scale = g.abs().amax(-1, keepdim=True) / ((qmax - qmin) / 2)
    return (torch.clamp(torch.round(g / scale), qmin, qmax) * scale).reshape(w.shape)


def test_quantization_is_round_to_nearest_checked_by_hand_on_a_tiny_tensor():
    layer = torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.75, -0.3, 0.1, 0.0], [-0.2, 0.06, 0.15, 0.01]]))
    model = torch.nn.Sequential(layer)
    quantize_weights(model, bits=4, group_size=4)
    # Row 1: scale 0.75 / 7.5 = 0.1; 0.75 -> 7.5 -> 7 (clamped: half a step off), -0.3 -> -3, 0.1 -> 1, 0 -> 0.
    # Row 2: scale 0.2 / 7.5; -0.2 -> -7.5 -> -8 (round half to even, in range), 0.06 -> 2.25 -> 2,
    #        0.15 -> 5.625 -> 6, 0.01 -> 0.375 -> 0.
    s = 0.2 / 7.5
    expected = torch.tensor([[0.7, -0.3, 0.1, 0.0], [-8 * s, 2 * s, 6 * s, 0.0]])
    assert torch.allclose(dequantized_weight(layer), expected, atol=1e-6)


@pytest.mark.parametrize("bits, group", [(8, 32), (4, 32), (4, 0)])
def test_quantize_moves_every_weight_by_at_most_half_a_step_and_matches_rtn(tiny, bits, group):
    model, _ = load_model(tiny)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    head = model.get_output_embeddings().weight.detach().clone()
    names = quantize_weights(model, bits, group)
    assert names == quantized_layers(model) and len(names) == 4 * 7  # q, k, v, o, gate, up, down per layer
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for name in names:
        w, q = before[name], dequantized_weight(model.get_submodule(name))
        g = group or w.shape[1]
        step = (w.reshape(w.shape[0], -1, g).abs().amax(-1, keepdim=True) / ((qmax - qmin) / 2))
        change = (q - w).reshape(w.shape[0], -1, g).abs()
        assert (change <= step / 2 * (1 + 1e-4)).all(), name  # 1e-4: float32 rounding of w - q near 127.5 steps
        # Round-to-nearest everywhere but at ties: a group's largest weight sits at exactly
        # qmax + 0.5 steps by construction, where either neighbour is nearest (float error decides).
        x = (w.reshape(w.shape[0], -1, g) / step).reshape(w.shape)
        tie = ((x.abs() - x.abs().floor()) - 0.5).abs() < 1e-4
        assert torch.allclose(q[~tie], rtn(w, bits, g)[~tie], atol=1e-7), name
        assert tie.sum() <= w.numel() / g + 0.01 * w.numel(), name  # ties: each group's maximum, and chance
        assert change.max() > 0  # it did round
    assert torch.equal(model.get_output_embeddings().weight, head)  # the head stays in full precision
    assert model(input_ids=torch.tensor([[1, 5, 7]])).logits.shape[-1] == head.shape[0]


def test_fewer_bits_move_the_weights_more(tiny):
    changes = {}
    for bits in (8, 4):
        model, _ = load_model(tiny)
        w = model.model.layers[0].mlp.up_proj.weight.detach().clone()
        quantize_weights(model, bits, 32)
        changes[bits] = (dequantized_weight(model.model.layers[0].mlp.up_proj) - w).abs().mean().item()
    assert 0 < changes[8] < changes[4] / 8


# ---------------------------------------------------------------- relearn_lora

def test_lora_relearning_trains_only_the_adapters_and_leaves_the_base_weights(tiny):
    model, tok = load_model(tiny)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = from_dict(LoraAttackConfig, {"rank": 4, "steps": 3, "eval_every": 3, "batch_size": 8, "seq_len": 48})
    adapted = with_lora(model, cfg, seed=0)
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x = torch.tensor([[1, 5, 7, 9]])
    plain, _ = load_model(tiny)
    assert torch.allclose(adapted(input_ids=x).logits, plain(input_ids=x).logits, atol=1e-6)  # B = 0 at the start
    task = arithmetic()
    out = finetune(task, adapted, tok, attack_examples(task, cfg, 0), cfg, 1e-2, 0, "lora test",
                   lambda m: task.evaluate(m, tok, quick=True))
    assert [p["step"] for p in out["curve"]] == [0, 3]
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # the adapters learned
    unloaded = adapted.unload()  # the base model without the adapters
    assert {n: p for n, p in unloaded.named_parameters()}.keys() == base.keys()
    assert all(torch.equal(p, base[n]) for n, p in unloaded.named_parameters())


# ---------------------------------------------------------------- heldout_relearn

def test_arithmetic_forget_halves_share_no_fact_and_cover_every_pair():
    task = arithmetic()
    seen, unseen = task.forget_halves()
    assert set(seen) == set(unseen) == {"multiplication/equation", "multiplication/word", "division/equation",
                                        "division/word"}

    def statements(half):
        return {(g.split("/")[0], *map(int, ex.prompt.removesuffix(" =").split(f" {'*' if 'mult' in g else '/'} ")))
                for g, exs in half.items() if g.endswith("equation") for ex in exs}

    a, b = statements(seen), statements(unseen)
    facts_a = {frozenset(same_fact(*s)) for s in a}
    facts_b = {frozenset(same_fact(*s)) for s in b}
    assert not facts_a & facts_b                         # 3 * 4 in one half: 4 * 3, 12 / 3, 12 / 4 there too
    everything = {(op, x, y) for op in ("multiplication", "division") for x, y in operand_pairs(op, 10)}
    assert a | b == everything and not a & b
    assert 0.4 < len(a) / len(everything) < 0.6
    words_a = {ex for g, exs in seen.items() if g.endswith("word") for ex in exs}
    assert not words_a & {ex for g, exs in unseen.items() for ex in exs}
    assert task.forget_halves() == (seen, unseen)        # seeded


def test_language_forget_halves_are_disjoint_documents():
    task = LanguageTask(LanguageOptions(train_documents=60, eval_documents=8, quick_eval_documents=4), seed=0)
    seen, unseen = halves(task)
    a, b = set(seen["forget"]), set(unseen["forget"])
    assert a and b and not a & b and len(a) + len(b) == len(set(task.train_texts("forget")))


def test_heldout_refuses_halves_that_share_an_example():
    class Leaky:
        name = "leaky"

        def forget_halves(self):
            ex = Example("2 * 3 =", " 6")
            return {"g": [ex]}, {"g": [Example("1 * 1 =", " 1"), ex]}

    with pytest.raises(UndoError, match="share 1 example"):
        halves(Leaky())


def test_a_task_without_halves_or_items_says_which_attack_needs_what():
    from toy_plugins import ToyTask

    task = ToyTask(ToyTask.Options(), seed=0)
    with pytest.raises(UndoError, match=r"task 'toy' does not provide forget_halves\(\)"):
        task.forget_halves()


# ---------------------------------------------------------------- fewshot

@pytest.mark.parametrize("k", [0, 1, 4, 16])
def test_fewshot_prompts_hold_k_forget_training_examples_of_the_group_never_an_eval_item(k):
    task = arithmetic()
    tok = train_tokenizer(task.tokenizer_corpus(), "bpe", 300)
    sep = separator(task, tok)
    assert sep == "\n"
    groups, used = fewshot_groups(task, tok, k, seed=0, max_tokens=100_000)
    items = task.forget_items()
    eval_prompts = {ex.prompt for exs in task.eval_examples().values() for ex in exs}
    assert used == k and groups.keys() == items.keys()
    for group, examples in groups.items():
        train = {ex.prompt + ex.completion for ex in task.fewshot_pool(group)}
        assert train <= {ex.prompt + ex.completion for ex in task.train_examples("forget")}
        for ex, item in zip(examples, items[group]):
            *shots, question = ex.prompt.split(sep)
            assert question == item.prompt and ex.completion == item.completion
            assert len(shots) == k and all(s in train for s in shots)
            assert not any(s.rsplit(" ", 1)[0] in eval_prompts for s in shots)  # no shot is an eval question
            if group.endswith("equation"):
                assert all(s.split(" ")[1] == item.prompt.split(" ")[1] for s in shots)  # same operation


def test_fewshot_prompts_are_nested_over_k_and_cut_to_the_context():
    task = arithmetic()
    tok = train_tokenizer(task.tokenizer_corpus(), "bpe", 300)
    four, _ = fewshot_groups(task, tok, 4, seed=3, max_tokens=100_000)
    one, _ = fewshot_groups(task, tok, 1, seed=3, max_tokens=100_000)
    other, _ = fewshot_groups(task, tok, 4, seed=4, max_tokens=100_000)
    g = "multiplication/equation"
    assert all(f.prompt.startswith(o.prompt.split("\n")[0] + "\n") for f, o in zip(four[g], one[g]))
    assert [e.prompt for e in four[g]] != [e.prompt for e in other[g]]
    cut, used = fewshot_groups(task, tok, 16, seed=0, max_tokens=60)
    assert used < 16
    from undo.tokenization import encode

    assert all(len(encode(tok, e.prompt + e.completion)) <= 60 for exs in cut.values() for e in exs
               if e.prompt.count("\n"))


def test_score_items_of_the_forget_items_is_the_tasks_forget_metric(tiny):
    task = arithmetic()
    model, tok = load_model(tiny)
    assert task.score_items(model, tok, task.forget_items(quick=True))["forget_acc"] == \
        task.evaluate(model, tok, quick=True)["forget_acc"]


# ---------------------------------------------------------------- all of them as stages

TRAIN = {"batch_size": 8, "seq_len": 48, "checkpoint_every": 0}
RELEARNING = {"lrs": [1e-3], "steps": 2, "eval_every": 1, "batch_size": 8, "seq_len": 48}
MICRO = {
    "name": "micro-attacks", "seed": 0,
    "task": {"name": "arithmetic", "options": {"examples_per_operation": 40, "eval_per_format": 4,
                                                "quick_eval_per_format": 2,
                                                "max_operand": {"multiplication": 6, "division": 6}}},
    "model": {"preset": "tiny"}, "tokenizer": {"kind": "bpe", "vocab_size": 300},
    "pretrain": {"steps": 8, "lr": 3e-3, **TRAIN},
    "unlearn": {"retain_tolerance": 10.0, "methods": [{"method": "graddiff", "train": {"steps": 2, **TRAIN}}]},
    "undo": {"alphas": [0.5], "unlearn_and_distill": False, "distill": {"steps": 2, "eval_every": 1, **TRAIN}},
    "attacks": [{"name": "relearn", "options": RELEARNING},
                {"name": "relearn_lora", "options": {**RELEARNING, "rank": 4}},
                {"name": "heldout_relearn", "options": {**RELEARNING, "eval_per_group": 3}},
                {"name": "quantize", "options": {"bits": [8, 4], "group_size": 32, "quick_eval": True}},
                {"name": "fewshot", "options": {"shots": [0, 2], "quick_eval": True, "max_context": 128}}],
}


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    from undo.engine.run import run_experiment

    run_dir = tmp_path_factory.mktemp("attacked")
    run_experiment(from_dict(ExperimentConfig, copy.deepcopy(MICRO)), run_dir)
    return run_dir


def test_every_attack_runs_on_every_model_and_reaches_the_store(attacked):
    from undo.store import ResultStore

    store = ResultStore(attacked / "results.sqlite")
    names = [m["name"] for m in store.models()]
    assert names == ["base", "oracle", "graddiff", "undo_a0.5"]
    assert store.attacks() == ["relearn", "relearn_lora", "heldout_relearn", "quantize", "fewshot"]
    for name in names:
        quantized = store.attack_points(name, attack="quantize")
        assert [(p["point"], p["step"]) for p in quantized] == [({"bits": 4}, 1), ({"bits": 8}, 1)]
        assert [p["step"] for p in store.attack_points(name, attack="fewshot")] == [0, 2]
        heldout = store.attack_points(name, attack="heldout_relearn")
        assert [p["step"] for p in heldout] == [0, 1, 2] and all("seen/forget_acc" in p["metrics"] for p in heldout)
        assert [p["lr"] for p in store.attack_points(name, attack="relearn_lora")] == [1e-3] * 3
    assert (attacked / "seed0" / "attack" / "quantize" / "base" / "bits4-as0" / "result.json").exists()


def test_the_report_has_the_attack_matrix(attacked):
    from undo.attack_matrix import attack_matrix
    from undo.report import summary_text
    from undo.store import ResultStore

    store = ResultStore(attacked / "results.sqlite")
    task = {"name": "arithmetic", "forget_metric": "forget_acc", "retain_metric": "retain_acc",
            "higher_is_better": True, "metric_label": "accuracy", "oracle_pretrain_flops": None}
    matrix = attack_matrix(store, task)
    assert [n for n, _ in matrix.models] == ["base", "oracle", "graddiff", "undo_a0.5"]
    assert len(matrix.cells) == 4 * 5 and all(len(v) == 1 for v in matrix.cells.values())
    for name, _ in matrix.models:  # relearning and few-shot include the unattacked model: never below it
        before = store.attack_points(name, attack="fewshot")[0]["metrics"]["forget_acc"]
        assert matrix.mean(name, "fewshot") >= before
    html = (attacked / "report" / "index.html").read_text()
    assert "<h2>Attack matrix</h2>" in html and 'src="attacks.png"' in html
    assert (attacked / "report" / "attacks.png").read_bytes().startswith(b"\x89PNG")
    text = summary_text(store, task)
    assert "attack matrix: recovered forget_acc" in text and "heldout_relearn" in text


def test_a_second_run_finds_every_attack_in_the_cache(attacked, monkeypatch):
    from undo.engine.run import run_experiment
    from undo.store import ResultStore

    def no_work(*args, **kwargs):
        raise AssertionError("a cached attack ran again")

    for target in ("undo.attacks.relearn.train", "undo.attacks.quantize.quantize_weights",
                   "undo.attacks.fewshot.fewshot_groups", "undo.stages.pretrain.train"):
        monkeypatch.setattr(target, no_work)
    run_experiment(from_dict(ExperimentConfig, copy.deepcopy(MICRO)), attacked)
    assert all(r["cached"] for r in ResultStore(attacked / "results.sqlite").stage_times())


def test_undo_attack_runs_any_attack_on_a_checkpoint(tiny, tmp_path, capsys):
    from undo.cli import main

    small = ["--set", "task.options.examples_per_operation=40", "--set", "task.options.eval_per_format=2",
             "--set", "task.options.quick_eval_per_format=1"]
    assert main(["attack", "quantize", "--model", str(tiny), "quick", "--run-dir", str(tmp_path), *small]) == 0
    out = capsys.readouterr().out
    assert "quantize: the attacker's best forget_acc" in out and "(bits" in out
    assert len(list((tmp_path / "attack" / "quantize").glob("*/bits4/result.json"))) == 1


def test_the_attacks_run_on_the_language_task(tmp_path):
    """Text: the forget metric is a cross-entropy (lower = more known); few-shot contexts are
    whole forget-language documents, cut to the context; halves are documents."""
    raw = {"name": "lang", "task": {"name": "language", "options": {
        "train_documents": 40, "eval_documents": 6, "quick_eval_documents": 3, "eval_seq_len": 64}},
        "model": {"preset": "tiny"}, "tokenizer": {"kind": "bpe", "vocab_size": 300}}
    exp = from_dict(ExperimentConfig, raw)
    task = build_task(exp.task, 0)
    tok = train_tokenizer(task.tokenizer_corpus(), "bpe", 300)
    path = tmp_path / "model"
    build_model(ModelConfig(preset="tiny"), tok, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    relearning = {"lrs": [1e-3], "steps": 2, "eval_every": 2, "batch_size": 4, "seq_len": 64}
    for name, options, steps in [("fewshot", {"shots": [0, 2]}, [0, 2]),
                                 ("heldout_relearn", {**relearning, "eval_per_group": 3}, [0, 2]),
                                 ("relearn_lora", {**relearning, "rank": 2}, [0, 2]),
                                 ("quantize", {"bits": [4], "group_size": 32, "quick_eval": True}, [1])]:
        attack = build_attack(name, options)
        (point,) = attack.points()
        curve = attack.run(exp, path, point, 0, name)["curve"]
        assert [c["step"] for c in curve] == steps, name
        assert all(0 < c["forget_ce"] < 20 for c in curve), name
    groups, used = fewshot_groups(task, tok, 2, seed=0, max_tokens=2000)  # documents are 100-400 tokens
    assert used == 2 and all(ex.prompt.count("\n") == 2 and ex.prompt.endswith("\n") for ex in groups["forget"])
    _, used = fewshot_groups(task, tok, 2, seed=0, max_tokens=512)
    assert used < 2  # a 512-position model fits fewer whole documents
