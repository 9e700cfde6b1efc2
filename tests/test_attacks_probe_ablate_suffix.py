"""The white-box attacks (issue 13: probe, suffix, ablate) do what they claim, on tiny models:
a linear probe reads the answers out of a model that knows them (and not out of a random one,
nor with shuffled labels); the GCG search lowers the forget loss with a string that survives
being written into the prompts as text; directional ablation leaves the residual stream with
no component along the direction, at every layer and in every supported architecture."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from undo import arch
from undo.attacks import build_attack, known_attacks
from undo.attacks.ablate import Ablate, AblateConfig, directions
from undo.attacks.probe import Probe, ProbeConfig, answer_context, probe_data, probe_layers
from undo.attacks.suffix import Suffix, SuffixConfig, build_layout, edit_prompt, gcg, row_losses
from undo.config import from_dict
from undo.data import BatchStream, task_rows
from undo.errors import UndoError
from undo.experiment import ExperimentConfig
from undo.metrics import greedy_complete, token_logprobs
from undo.models import load_model
from undo.tasks import TaskConfig, register_task
from undo.tasks.base import Example, Task
from undo.tokenization import encode, train_tokenizer
from undo.training import TrainConfig, lm_loss, train

LABELS = ["cat", "dog", "owl", "pig"]  # distinct first characters: the answer is decided at its first token


@dataclasses.dataclass
class FactsOptions:
    facts: int = 120
    held_out: int = 40
    loss_on: str = "completion"
    row_format: str = "padded"


class Facts(Task):
    """Memorised facts: "k17 :" -> one of four animals, drawn at random per key (forget: keys
    k*, retain: keys q*). The last `held_out` forget facts are the items `evaluate` scores;
    a probe trains on the others, so it can only score well if the model's stream holds the
    answer itself (a random label cannot be computed from the key's characters)."""

    name = "facts_toy"
    Options = FactsOptions

    def _facts(self, domain):
        rng = random.Random(f"{self.seed}-{domain}")
        key = "k" if domain == "forget" else "q"
        return [Example(f"{key}{i} :", f" {rng.choice(LABELS)}") for i in range(self.options.facts)]

    def train_examples(self, domain):
        return self._facts(domain)

    def tokenizer_corpus(self):
        return [e.prompt + e.completion for d in ("forget", "retain") for e in self._facts(d)]

    def forget_items(self, quick=False):
        return {"facts": self._facts("forget")[-self.options.held_out:]}

    def score_items(self, model, tokenizer, groups):
        metrics = {}
        for group, examples in groups.items():
            outputs = greedy_complete(model, tokenizer, [e.prompt for e in examples], max_new_tokens=5)
            metrics[f"{group}/acc"] = sum(o.strip() == e.completion.strip() for o, e in zip(outputs, examples)) / len(examples)
        metrics["forget_acc"] = sum(metrics.values()) / len(metrics)
        return metrics

    def evaluate(self, model, tokenizer, quick=False):
        return {**self.score_items(model, tokenizer, self.forget_items()),
                "retain_acc": self.score_items(model, tokenizer, {"r": self._facts("retain")})["forget_acc"]}


register_task("facts_toy", Facts)
EXP = ExperimentConfig(task=TaskConfig("facts_toy"))


def small_llama(tok, seed):
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                  max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A small Llama trained until it knows every forget fact ("knows"), and one never trained
    ("random"), saved as checkpoints with the task's character tokenizer."""
    task = Facts(FactsOptions(), 0)
    tok = train_tokenizer(task.tokenizer_corpus(), "char", 64)
    model = small_llama(tok, 0)
    rows = task_rows(tok, task, task.train_examples("forget"), 32)
    train(model, lm_loss, {"train": BatchStream(rows, 64, seed=0)},
          TrainConfig(steps=300, batch_size=64, seq_len=32, lr=1e-2, warmup_steps=10, checkpoint_every=0), seed=0,
          desc="facts")
    assert task.evaluate(model, tok)["forget_acc"] == 1.0  # it knows every fact, held-out items included
    paths = {}
    for name, m in (("knows", model), ("random", small_llama(tok, 1))):
        paths[name] = tmp_path_factory.mktemp(name) / "model"
        m.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return paths


def test_the_white_box_attacks_are_registered_with_defaults_that_validate():
    assert {"probe", "suffix", "ablate"} <= set(known_attacks())
    for name in ("probe", "suffix", "ablate"):
        attack = build_attack(name)
        assert attack.points() == [{}]
    assert build_attack("probe").matrix_metric == "probe_acc"


@pytest.mark.parametrize("cls, key, value", [(ProbeConfig, "train_examples", 5), (ProbeConfig, "C", 0.0),
                                             (SuffixConfig, "length", 0), (SuffixConfig, "candidates", 0),
                                             (AblateConfig, "examples", 0)])
def test_settings_that_cannot_run_are_rejected(cls, key, value):
    with pytest.raises(UndoError, match=key):
        from_dict(cls, {key: value}, "attack")


# ---------------------------------------------------------------- ablate


ARCHS = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
    "gemma2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8),
    "gpt2": dict(n_embd=32, n_layer=3, n_head=4, n_positions=64),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4),
}


@pytest.mark.parametrize("model_type", ARCHS)
def test_ablation_leaves_the_residual_stream_no_component_along_the_direction(model_type):
    config = AutoConfig.for_model(model_type, vocab_size=50, max_position_embeddings=64, **ARCHS[model_type])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 50, (2, 9))
    direction = torch.randn(32)
    unit = direction / direction.norm()
    with torch.no_grad():
        streams = arch.residual_streams(model, ids)
        reference = model(input_ids=ids, output_hidden_states=True).hidden_states
        with arch.direction_ablated(model, direction):
            ablated = arch.residual_streams(model, ids)
            logits = model(input_ids=ids).logits
        after = arch.residual_streams(model, ids)
    assert len(streams) == 4  # embeddings + after each of 3 layers
    for mine, theirs in zip(streams[:-1], reference[:-1]):  # HF's last entry is after the final norm
        assert torch.allclose(mine, theirs, atol=1e-6)
    for h in streams[1:]:
        assert (h @ unit).abs().max() > 1e-2 * h.norm(dim=-1).max()  # there was a component to remove
    for h in ablated:
        assert (h @ unit).abs().max() <= 1e-5 * h.norm(dim=-1).max()  # at every depth, every position
    assert torch.isfinite(logits).all()
    for h, g in zip(after, streams):  # the hooks are gone afterwards
        assert torch.equal(h, g)


def test_ablation_refuses_a_zero_direction():
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=50, **ARCHS["llama"]))
    with pytest.raises(UndoError, match="zero"):
        with arch.direction_ablated(model, torch.zeros(32)):
            pass


def test_the_candidate_directions_are_the_documented_differences_of_means():
    u = {"forget": torch.tensor([[3.0, 1.0]]), "retain": torch.tensor([[1.0, 1.0]])}
    b = {"forget": torch.tensor([[1.0, 2.0]]), "retain": torch.tensor([[0.0, 2.0]])}
    assert directions("forget_retain", u).tolist() == [[2.0, 0.0]]
    assert directions("unlearned_base", u, b).tolist() == [[2.0, -1.0]]
    assert directions("both", u, b).tolist() == [[1.0, 0.0]]
    with pytest.raises(UndoError, match="needs the base"):
        directions("both", u)


def test_ablate_runs_and_a_model_against_itself_has_nothing_to_remove(models):
    own = Ablate(AblateConfig(base=str(models["knows"]), examples=32, select_examples=20))
    out = own.run(EXP, models["knows"], {}, 0, "ablate")
    before, after = out["curve"]
    assert out["contrast"] == "both" and after["ablate_norm"] == 0.0 and after["ablate_layer"] == -1
    assert after["forget_acc"] == before["forget_acc"] == 1.0

    fr = Ablate(AblateConfig(contrast="forget_retain", examples=32, select_examples=20))
    out = fr.run(EXP, models["knows"], {}, 0, "ablate")
    before, after = out["curve"]
    assert [before["step"], after["step"]] == [0, 1] and 0 <= after["ablate_layer"] <= 2
    assert after["ablate_norm"] > 0 and out["flops"] > 0
    assert set(k for k in after if k.startswith("ablate_select/")) <= {f"ablate_select/layer{k}" for k in range(3)}


# ---------------------------------------------------------------- probe


def test_a_probe_finds_a_planted_signal_at_its_depth_and_a_control_probe_does_not():
    rng = np.random.default_rng(0)
    n_train, n_test, hidden, classes = 200, 200, 16, 4
    labels = rng.integers(0, classes, n_train + n_test)
    x = rng.normal(size=(3, n_train + n_test, hidden)).astype(np.float32)
    x[1, :, :classes] += 8.0 * np.eye(classes)[labels]  # depth 1 holds the label, linearly
    names = [LABELS[i] for i in labels]
    feats = torch.from_numpy(x)
    result = probe_layers(feats[:, :n_train], names[:n_train], feats[:, n_train:], names[n_train:])
    assert result["layer"] == 1 and result["acc"] > 0.95
    assert max(result["test_acc"][0], result["test_acc"][2]) < 0.4       # noise depths: chance (0.25)
    shuffled = list(names[:n_train])
    random.Random(0).shuffle(shuffled)
    control = probe_layers(feats[:, :n_train], shuffled, feats[:, n_train:], names[n_train:])
    assert control["acc"] < 0.4


def test_the_probe_reads_the_answers_from_a_model_that_knows_them_and_not_from_a_random_one(models):
    knows = Probe(ProbeConfig()).run(EXP, models["knows"], {}, 0, "probe")
    entry = knows["curve"][0]
    assert knows["labels"] == "answer" and knows["train_examples"] == 80 and knows["test_examples"] == 40
    assert entry["step"] == 1 and entry["probe_acc"] >= 0.95               # ~100% on held-out facts
    assert entry["probe_control_acc"] <= 0.5                               # shuffled labels: near chance
    assert sorted(k for k in entry if k.startswith("probe_acc/")) == [f"probe_acc/layer{k}" for k in range(3)]
    assert entry["probe_acc/layer0"] <= 0.5   # the embedding of the token read says nothing
    random_model = Probe(ProbeConfig()).run(EXP, models["random"], {}, 0, "probe")["curve"][0]
    assert random_model["probe_acc"] <= 0.5


def test_the_probe_reads_where_the_answer_is_due_and_never_trains_on_a_test_prompt(models):
    _, tok = load_model(models["knows"])
    [ids] = answer_context(tok, ["k7 :"], [" dog"])
    assert ids == encode(tok, "k7 :") + encode(tok, " ")  # char tokens: " " then "d"; "d" is due at " "
    task = Facts(FactsOptions(), 0)
    kind, train_set, test_set = probe_data(task, ProbeConfig(), 0)
    assert kind == "answer" and not {t for t, _, _ in train_set} & {t for t, _, _ in test_set}
    kind, train_set, test_set = probe_data(task, ProbeConfig(labels="domain"), 0)
    assert kind == "domain" and {y for *_, y in train_set} == {y for *_, y in test_set} == {"forget", "retain"}
    assert not {t for t, _, _ in train_set} & {t for t, _, _ in test_set}


# ---------------------------------------------------------------- suffix


def test_the_gcg_search_lowers_the_forget_loss_with_a_string_that_round_trips(models):
    model, tok = load_model(models["random"])
    examples = Facts(FactsOptions(), 0).train_examples("forget")[:4]
    cfg = SuffixConfig(length=4, steps=8, top_k=16, candidates=16)
    found = gcg(model, tok, examples, cfg, seed=0)
    assert found.loss < found.loss_start and len(found.adv) == 4 and len(found.losses) == 8
    assert found.round_trips and not set(found.adv) & set(tok.all_special_ids)
    for ex in examples:  # the text, written into a prompt, is exactly the searched tokens
        assert encode(tok, edit_prompt(found.text, ex.prompt, "suffix")) == encode(tok, ex.prompt) + found.adv
    assert all(p.requires_grad for p in model.parameters())  # frozen for the search only


def test_the_suffix_attack_scores_the_forget_items_with_and_without_the_string(models):
    cfg = SuffixConfig(length=3, steps=3, top_k=8, candidates=8, prompts=4, position="prefix")
    out = Suffix(cfg).run(EXP, models["random"], {}, 0, "suffix")
    before, after = out["curve"]
    assert [before["step"], after["step"]] == [0, 1] and "forget_acc" in before and "forget_acc" in after
    assert after["suffix_loss"] <= after["suffix_loss_start"] and out["flops"] > 0
    assert after["suffix_item_loss"] > 0 and after["suffix_item_loss_before"] > 0
    assert isinstance(out["suffix"], str) and len(out["suffix_ids"]) == 3 and len(out["loss_history"]) == 3


def test_the_search_loss_with_the_head_on_answer_positions_only_equals_the_full_forward(models):
    model, tok = load_model(models["knows"])
    layout = build_layout(tok, Facts(FactsOptions(), 0).train_examples("forget")[:6], 3, "suffix", 64)
    adv = torch.randint(5, 20, (2, 3))
    ids, attention, labels = layout.fill(adv), layout.attention.repeat(2, 1), layout.labels.repeat(2, 1)
    with torch.no_grad():
        short = row_losses(model, ids, attention, labels)
        logp, mask = token_logprobs(model(input_ids=ids, attention_mask=attention).logits, labels)
    assert torch.allclose(short, -logp.sum(1) / mask.sum(1), atol=1e-6)


def test_the_white_box_attacks_run_on_the_language_task(tmp_path):
    """Text has no answer classes: the probe labels forget vs retain documents; the suffix is
    a prefix of each document (an empty prompt), scored by the documents' cross-entropy."""
    from undo.models import ModelConfig, build_model
    from undo.tasks import build_task

    exp = from_dict(ExperimentConfig, {"name": "lang", "task": {"name": "language", "options": {
        "train_documents": 40, "eval_documents": 6, "quick_eval_documents": 3, "eval_seq_len": 64}}})
    task = build_task(exp.task, 0)
    tok = train_tokenizer(task.tokenizer_corpus(), "bpe", 300)
    path = tmp_path / "model"
    build_model(ModelConfig(preset="tiny"), tok, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    probe = build_attack("probe", {"max_tokens": 32}).run(exp, path, {}, 0, "probe")
    assert probe["labels"] == "domain" and 0 <= probe["curve"][0]["probe_acc"] <= 1
    ablate = build_attack("ablate", {"examples": 8, "select_examples": 4, "max_tokens": 32}).run(exp, path, {}, 0, "ablate")
    assert ablate["contrast"] == "forget_retain" and [c["step"] for c in ablate["curve"]] == [0, 1]
    suffix = build_attack("suffix", {"length": 3, "steps": 2, "candidates": 4, "prompts": 2, "max_answer_tokens": 16})
    out = suffix.run(exp, path, {}, 0, "suffix")
    for curve in (ablate["curve"], out["curve"]):
        assert all(0 < c["forget_ce"] < 20 for c in curve)
    assert out["curve"][1]["suffix_loss"] <= out["curve"][1]["suffix_loss_start"]


def test_undo_attack_probe_reports_the_probe_accuracy(models, tmp_path, capsys):
    from undo.cli import main

    config = tmp_path / "facts.yaml"
    config.write_text("name: facts\ntask: {name: facts_toy}\n")
    assert main(["attack", "probe", "--model", str(models["knows"]), str(config), "--run-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "probe: the attacker's best probe_acc" in out and "step    1  1.0000" in out
