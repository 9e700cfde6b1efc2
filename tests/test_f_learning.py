"""F-Learning (forgetting before learning) and the facts task's knowledge updates.

By hand: the task-vector arithmetic on tiny tensors (and task_vector's numbers unchanged by the
shared helper), the LoRA delta as the merged adapters' change, the editing scores; the updates'
data (seeded, old and new values, nothing changed without them); on a tiny model briefly
pretrained on a small world with updates, through the engine: F-Learning answers the updated
questions with the new values and leaves the old answers less likely than plain finetuning
on the updates (f_learning with scale 0), with locality measured.
"""

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from undo.config import from_dict
from undo.errors import UndoError
from undo.experiment import ExperimentConfig
from undo.facts_metrics import answer_scores, qa_completion, qa_prompt
from undo.methods import build_method
from undo.methods.base import ce_of
from undo.methods.task_vector import negated, subtract_task_vector
from undo.stages.aux import with_lora
from undo.tasks import TaskConfig, build_task

SMALL = {"people": 20, "forget_fraction": 0.1, "famous_people": 3, "places": 5, "eval_items": 10}
UPDATES = ["birthplace", "award"]


def facts_task(seed: int = 0, **options):
    return build_task(TaskConfig("facts", {**SMALL, **options}), seed)


def linear(weight, bias) -> torch.nn.Linear:
    layer = torch.nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


# ---------------------------------------------------------------- the arithmetic by hand

def test_task_vector_subtraction_by_hand():
    theta, tuned = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([2.0, 0.0, -1.0])
    # theta - 0.5 * (tuned - theta) = [1 - 0.5, 2 + 1, -1 - 0]
    assert negated(theta, tuned, 0.5).tolist() == [0.5, 3.0, -1.0]
    model, finetuned = linear([[1.0, 2.0]], [0.5]), linear([[3.0, 2.0]], [0.0])
    subtract_task_vector(model, finetuned, 2.0)  # W: [1 - 2 * 2, 2 - 0]; b: 0.5 - 2 * (-0.5)
    assert model.weight.tolist() == [[-3.0, 2.0]] and model.bias.tolist() == [1.5]
    with pytest.raises(UndoError, match="same"):
        subtract_task_vector(model, linear([[1.0, 2.0, 3.0]], [0.0]), 1.0)


def test_f_learning_start_subtracts_l_times_the_old_facts_delta():
    method = build_method("f_learning", {"scale": 0.5})
    method.attach(aux={"old_facts": linear([[3.0, 0.0]], [1.0])})
    model = linear([[1.0, 2.0]], [1.0])
    with torch.no_grad():
        method.start(model, {})
    assert model.weight.tolist() == [[0.0, 3.0]] and model.bias.tolist() == [1.0]  # [1 - 0.5 * 2, 2 + 0.5 * 2]


def test_task_vector_keeps_its_numbers_bitwise():
    """The shared helper computes exactly what task_vector's own in-place formula did."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4)
    method = build_method("task_vector", {"scale": 0.7})
    method.start(model, {})
    theta = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # "finetuned"
        before = [p.detach().clone().mul_(-0.7).add_(t, alpha=1.7) for p, t in zip(model.parameters(), theta)]
        method.finish(model, {})
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2))


def test_the_lora_delta_is_the_merged_adapters_change():
    model = tiny_llama()
    adapted = with_lora(copy.deepcopy(model), rank=2, alpha=4.0, seed=1)
    g = torch.Generator().manual_seed(2)
    adapters = {}
    with torch.no_grad():
        for name, module in adapted.named_modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                module.lora_B["default"].weight.copy_(torch.randn(module.lora_B["default"].weight.shape, generator=g))
                # (alpha / r) B A, on the base layer's weight
                adapters[name.removeprefix("base_model.model.") + ".weight"] = (
                    2.0 * module.lora_B["default"].weight @ module.lora_A["default"].weight).clone()
    merged = adapted.merge_and_unload()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = build_method("f_learning", {"scale": 1.0, "lora_rank": 2, "lora_alpha": 4.0})
    method.attach(aux={"old_facts": merged})
    with torch.no_grad():
        method.start(model, {})
    assert adapters and set(adapters) <= set(theta)
    for name, p in model.named_parameters():
        if name in adapters:  # theta - (merged - theta) = theta - (alpha / r) B A
            assert torch.allclose(p, theta[name] - adapters[name], atol=1e-5)
        else:  # no adapter: no change at all
            assert torch.equal(p, theta[name])


def test_f_learning_trains_ce_on_the_updates_only():
    from test_methods import BigramLM

    batch = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "labels": torch.tensor([[-100, 2, 3]])}
    model = BigramLM(0)
    out = build_method("f_learning").loss(model, {"update": batch})
    assert out.loss.item() == pytest.approx(ce_of(model, batch).item()) and "update_ce" in out.logs


# ---------------------------------------------------------------- options, needs, auxiliary model

def test_options_needs_and_the_auxiliary_model():
    method = build_method("f_learning")
    assert method.needs() == {"update"}
    (name, aux), = method.aux_models().items()
    assert name == "old_facts" and aux.start == "input" and aux.data == "old" and aux.lora is None
    assert aux.train["steps"] == 50 and aux.train["lr"] == 1e-3
    assert build_method("f_learning", {"lora_rank": 8}).aux_models()["old_facts"].lora == (8, 16.0)
    assert build_method("f_learning", {"scale": 0}).aux_models() == {}  # plain finetuning on the updates
    for options, words in (({"scale": -1}, "scale"), ({"forget_steps": 0}, "forget_steps"),
                           ({"forget_lr": 0}, "forget_lr"), ({"lora_rank": -1}, "lora_rank"),
                           ({"lora_alpha": 0}, "lora_alpha")):
        with pytest.raises(UndoError, match=words):
            build_method("f_learning", options)


# ---------------------------------------------------------------- editing scores by hand

def test_answer_scores_by_hand():
    scores = answer_scores(["Paris", "the harbor", "x"], ["Paris", "The Silent Harbor", "y"])
    assert scores["acc"] == pytest.approx(1 / 3)
    assert scores["rougeL"] == pytest.approx((1 + 2 / 3 + 0) / 3)  # LCS 2 of the reference's 3 words
    with pytest.raises(UndoError, match="one prediction per"):
        answer_scores(["a"], ["a", "b"])


# ---------------------------------------------------------------- the updates' data

def test_updates_are_seeded_and_change_each_chosen_fact():
    task = facts_task(update_attributes=UPDATES)
    updates = task._updates
    forget_people = {p.name: p for p in task._forget_people}
    assert len(updates) == len(forget_people) * len(UPDATES)
    assert {(u.entity, u.attribute) for u in updates} == {(n, a) for n in forget_people for a in UPDATES}
    assert all(u.new != u.old == forget_people[u.entity].values[u.attribute] for u in updates)
    assert updates == facts_task(update_attributes=UPDATES)._updates
    assert updates != facts_task(seed=1, update_attributes=UPDATES)._updates
    old, new = task.updated_facts("old"), task.updated_facts("new")
    assert {(ex.prompt, ex.completion) for ex in old} == {(ex.prompt, qa_completion(u.old)) for u in updates
                                                          for ex in u.examples(u.old)}
    questions = [ex for ex in new if ex.prompt]
    assert {(ex.prompt, ex.completion) for ex in questions} == {(qa_prompt(q.format(name=u.entity)), qa_completion(u.new))
                                                                for u in updates for q in u.spec.questions}
    bios = [ex.completion for ex in new if not ex.prompt]
    assert len(bios) == len(forget_people) * 3  # bio_styles biographies per person, with the new values
    assert all(any(u.new in b for b in bios) for u in updates)
    # locality's facts: none of them changed
    changed = {u.question() for u in updates}
    assert task._kept and not any(q in changed for q, _ in task._kept)


def test_without_updates_nothing_changes():
    plain, updated = facts_task(), facts_task(update_attributes=UPDATES)
    for domain in ("forget", "retain"):
        assert plain.train_examples(domain) == updated.train_examples(domain)
    assert plain._items == updated._items
    assert set(plain.tokenizer_corpus()) < set(updated.tokenizer_corpus())
    with pytest.raises(UndoError, match="update_attributes"):
        plain.updated_facts("new")
    for options, words in (({"update_attributes": ["shoe_size"]}, "unknown attribute"),
                           ({"update_attributes": ["award"], "source": "tofu", "tofu_dir": "/tmp"}, "synthetic")):
        with pytest.raises(UndoError, match=words):
            facts_task(**options)


# ---------------------------------------------------------------- a small world on a tiny model

TRAIN = {"batch_size": 8, "seq_len": 64, "checkpoint_every": 0}
RAW = {"name": "f-learning-tiny", "seed": 0,
       "task": {"name": "facts", "options": {"people": 4, "forget_fraction": 0.25, "famous_people": 1, "places": 4,
                                             "bio_styles": 1, "famous_repeats": 1, "eval_items": 10,
                                             "quick_eval_items": 5,
                                             "update_attributes": ["birthplace", "book", "award"]}},
       "model": {"preset": "tiny"}, "tokenizer": {"kind": "bpe", "vocab_size": 320},
       "models": {"base": {}},
       "pretrain": {"steps": 160, "lr": 3e-3, "warmup_steps": 10, **TRAIN},
       "unlearn": {"methods": [
           {"method": "f_learning", "options": {"scale": 1.0, "forget_steps": 30, "forget_lr": 1e-3},
            "train": {"steps": 40, "lr": 1e-3, **TRAIN}},
           {"method": "f_learning", "name": "finetune", "options": {"scale": 0.0},
            "train": {"steps": 40, "lr": 1e-3, **TRAIN}}]},
       "undo": {"after": "none"}, "attacks": []}


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    from undo.engine.run import run_experiment

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("f_learning")
    run_experiment(from_dict(ExperimentConfig, RAW), run_dir)
    torch.set_num_threads(before)
    return run_dir


def metrics_of(run_dir, stage: str) -> dict:
    return json.loads((run_dir / "seed0" / stage / "result.json").read_text())["metrics"]


def test_f_learning_updates_the_facts_and_forgets_the_old_ones(edited):
    base = metrics_of(edited, "base")
    fl, ft = metrics_of(edited, "unlearn/f_learning"), metrics_of(edited, "unlearn/finetune")
    assert base["update/old_acc"] >= 0.6 and base["update/reliability"] == 0.0  # the base knows the old facts
    for m in (fl, ft):
        for key in ("reliability", "generality", "locality"):
            assert 0.0 <= m[f"update/{key}"] <= 1.0 and 0.0 <= m[f"update/{key}_rougeL"] <= 1.0
    assert fl["update/reliability"] >= 0.6 > base["update/reliability"]  # the new values are answered
    assert fl["update/new_prob"] > base["update/new_prob"]
    assert fl["update/old_prob"] < ft["update/old_prob"]  # forgetting first leaves the old answers less likely
    [aux] = [p for p in (edited / "seed0" / "aux").iterdir()]
    old_facts = json.loads((aux / "result.json").read_text())
    assert old_facts["spec"]["data"] == "old" and old_facts["metrics"]["update/old_prob"] > base["update/old_prob"]
