"""SISA (Bourtoule et al.): the ensemble model, the deletion that retrains only affected shards
from the right slice checkpoint, what the retrained shards saw, and the cost against a full
retrain. Unit tests run the method on a list task whose forget set we place by seed; one
test runs it through the engine (aux chain stages, the unlearn stage, a saved ensemble)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from test_engine import TRAIN, micro
from undo.data import aux_examples, shard_examples, slice_examples
from undo.engine.graph import build_graph
from undo.engine.run import run_experiment
from undo.ensemble import EnsembleForCausalLM, mean_softmax_logits
from undo.errors import UndoError
from undo.methods import build_method
from undo.methods.sisa import INIT_SEED, aux_name
from undo.metrics import masked_ce
from undo.models import fresh_copy, load_model, non_embedding_params
from undo.tasks.base import Example, Task
from undo.tokenization import train_tokenizer

S, R = 3, 3


class ListTask(Task):
    """Fixed retain and forget examples, one per row: we know where each lands."""

    name = "sisa_list"
    Options = SimpleNamespace

    def __init__(self, retain: list[Example], forget: list[Example], seed: int):
        super().__init__(SimpleNamespace(loss_on="all", row_format="padded"), seed)
        self.data = {"retain": retain, "forget": forget}

    def train_examples(self, domain):
        return list(self.data[domain])

    def tokenizer_corpus(self):
        return [ex.completion for d in self.data.values() for ex in d]

    def evaluate(self, model, tokenizer, quick=False):
        return {}


def tiny_llama(tok, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def list_task(seed: int, forget: int = 1) -> ListTask:
    return ListTask([Example("", f"keep line {i} of the list") for i in range(24)],
                    [Example("", f"drop line {i} now") for i in range(forget)], seed)


def where_forget(task: ListTask, seed: int) -> dict[int, int]:
    """Shard -> first slice holding a forget example, worked out from the shards and slices."""
    forget, out = set(task.train_examples("forget")), {}
    for i in range(S):
        for r, part in enumerate(slice_examples(aux_examples(task, "all", (i, S), seed), R)):
            if i not in out and forget & set(part):
                out[i] = r
    return out


def seed_where(first_slice: int) -> int:
    """A seed whose one forget example lands in slice `first_slice` of its shard."""
    return next(s for s in range(100) if list(where_forget(list_task(s), s).values()) == [first_slice])


def sisa_setup(seed: int, steps: int, forget: int = 1):
    """The method with stand-in checkpoints (distinct random models) as its S x R aux models."""
    task = list_task(seed, forget)
    tok = train_tokenizer(task.tokenizer_corpus(), "char", 64)
    base = tiny_llama(tok)
    method = build_method("sisa", {"shards": S, "slices": R, "evaluate_before": False,
                                   "slice_train": {"steps": steps, "batch_size": 4, "seq_len": 32}}, seed=seed)
    aux = {name: fresh_copy(base, seed=100 + k).eval().requires_grad_(False)
           for k, name in enumerate(method.aux_models())}
    method.attach(aux=aux)
    method.bind_task(task, tok)
    return method, task, base, aux


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- the ensemble model

def test_ensemble_logits_are_the_log_of_the_mean_softmax_worked_by_hand():
    # softmaxes (1/4, 3/4) and (3/4, 1/4): their mean is (1/2, 1/2)
    a = torch.tensor([[[0.0, math.log(3.0)]]])
    b = torch.tensor([[[math.log(3.0), 0.0]]])
    assert torch.allclose(mean_softmax_logits([a, b]), torch.full((1, 1, 2), -math.log(2.0)), atol=1e-7)
    # (e^0, e^1, e^2)/Z and the uniform: the log of their mean, entry by entry
    c, d = torch.tensor([0.0, 1.0, 2.0]), torch.zeros(3)
    z = 1 + math.e + math.e ** 2
    want = torch.tensor([math.log((1 / z + 1 / 3) / 2), math.log((math.e / z + 1 / 3) / 2),
                         math.log((math.e ** 2 / z + 1 / 3) / 2)])
    assert torch.allclose(mean_softmax_logits([c, d]), want, atol=1e-6)


def test_ensemble_forward_aggregates_its_members_and_its_loss_is_the_aggregate_ce():
    tok = train_tokenizer(["abc def"], "char", 32)
    members = [tiny_llama(tok, seed) for seed in (1, 2, 3)]
    ensemble = EnsembleForCausalLM.from_members(members).eval()
    ids = torch.tensor([[tok.bos_token_id, 5, 6, 7, 8]])
    with torch.no_grad():
        out = ensemble(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        probs = torch.stack([m(input_ids=ids).logits.softmax(-1) for m in members]).mean(0)
    assert torch.allclose(out.logits, probs.log(), atol=1e-6)
    assert torch.allclose(out.logits.softmax(-1), probs, atol=1e-6)  # a softmax of the logits is the mean
    assert torch.allclose(out.loss, masked_ce(out.logits, ids), atol=1e-6)
    assert non_embedding_params(ensemble) == sum(non_embedding_params(m) for m in members)


def test_ensemble_save_and_load_round_trip_gives_identical_logits_and_generations(tmp_path):
    tok = train_tokenizer(["abc def ghi"], "char", 32)
    ensemble = EnsembleForCausalLM.from_members([tiny_llama(tok, seed) for seed in (1, 2)]).eval()
    ensemble.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    assert isinstance(loaded, EnsembleForCausalLM) and len(loaded.members) == 2
    ids = torch.tensor([[tok.bos_token_id, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(ensemble(input_ids=ids).logits, loaded.eval()(input_ids=ids).logits)
        gen = loaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                              do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
        greedy = ids
        for _ in range(4):  # greedy by hand on the aggregate's logits
            nxt = ensemble(input_ids=greedy).logits[:, -1].argmax(-1, keepdim=True)
            greedy = torch.cat([greedy, nxt], 1)
    assert torch.equal(gen, greedy)


def test_generation_with_the_members_kv_caches_equals_recomputing_every_prefix():
    tok = train_tokenizer(["abc def ghi"], "char", 32)
    ensemble = EnsembleForCausalLM.from_members([tiny_llama(tok, seed) for seed in (1, 2, 3)]).eval()
    pad = tok.pad_token_id
    ids = torch.tensor([[pad, pad, tok.bos_token_id, 5, 6], [tok.bos_token_id, 7, 8, 9, 5]])  # left padding
    kwargs = dict(attention_mask=(ids != pad).long(), max_new_tokens=6, do_sample=False, pad_token_id=pad)
    with torch.no_grad():
        cached = ensemble.generate(input_ids=ids, **kwargs)
        recomputed = ensemble.generate(input_ids=ids, use_cache=False, **kwargs)
    assert torch.equal(cached, recomputed)


def test_members_of_different_architectures_are_refused():
    tok = train_tokenizer(["abc"], "char", 32)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(UndoError, match="one architecture"):
        EnsembleForCausalLM.from_members([tiny_llama(tok), other])


# ---------------------------------------------------------------- the deletion

def test_only_the_affected_shard_is_retrained_from_the_checkpoint_before_its_slice():
    seed = seed_where(1)
    method, task, base, aux = sisa_setup(seed, steps=0)  # 0 steps: a retrained shard is its start checkpoint
    (shard, first), = where_forget(task, seed).items()
    before = {name: state(m) for name, m in aux.items()}
    ensemble = method.export(base)
    assert method.report()["sisa"]["retrained_from_slice"] == {str(shard): first}
    assert set(method.trained_on) == {(shard, r) for r in range(first, R)}
    for i, member in enumerate(ensemble.members):
        if i == shard:
            assert same(state(member), before[aux_name(i, first - 1)])
            assert not same(state(member), before[aux_name(i, R - 1)])
        else:  # kept bit for bit
            assert member is aux[aux_name(i, R - 1)] and same(state(member), before[aux_name(i, R - 1)])


def test_a_deletion_in_the_first_slice_restarts_the_shard_from_its_random_init():
    seed = seed_where(0)
    method, task, base, _ = sisa_setup(seed, steps=0)
    (shard, _), = where_forget(task, seed).items()
    ensemble = method.export(base)
    assert same(state(ensemble.members[shard]), state(fresh_copy(base, seed=seed + INIT_SEED)))


def test_the_retrained_shard_never_sees_a_deleted_example_and_the_others_are_untouched():
    seed = seed_where(1)
    method, task, base, aux = sisa_setup(seed, steps=2)
    (shard, first), = where_forget(task, seed).items()
    before = {name: state(m) for name, m in aux.items()}
    ensemble = method.export(base)
    deleted = set(task.train_examples("forget"))
    slices = slice_examples(aux_examples(task, "all", (shard, S), seed), R)
    for (i, r), seen in method.trained_on.items():
        assert not deleted & set(seen)
        assert seen == [ex for part in slices[:r + 1] for ex in part if ex not in deleted]
    assert not same(state(ensemble.members[shard]), before[aux_name(shard, first - 1)])  # it did train
    for i in set(range(S)) - {shard}:
        assert same(state(ensemble.members[i]), before[aux_name(i, R - 1)])


def test_the_cost_reported_is_a_fraction_of_a_full_retrain_when_few_shards_hold_deletions():
    seed = seed_where(1)
    method, task, base, _ = sisa_setup(seed, steps=2)
    method.export(base)
    report = method.report()
    sisa, retrain, full = report["sisa"], report["sisa"]["retrain"], report["sisa"]["full_retrain"]
    assert retrain["steps"] == 2 * (R - 1) and full["steps"] == 2 * S * R
    assert 0 < retrain["flops"] < full["flops"] and 0 < retrain["examples"] < full["examples"]
    assert sisa["retrain_fraction"]["flops"] == pytest.approx(retrain["flops"] / full["flops"])
    assert report["flops"] == retrain["flops"] and report["steps"] == retrain["steps"]  # the stage adds these
    assert sisa["deleted_examples"] == 1 and len(sisa["kept_shards"]) == S - 1


def test_bad_options_stop_with_one_clear_message():
    for options, match in (({"shards": 0}, "shards must be at least 1"), ({"slices": 0}, "slices must be at least 1"),
                           ({"slice_train": {"stepz": 3}}, "unknown key 'stepz'")):
        with pytest.raises(UndoError, match=match):
            build_method("sisa", options)


# ---------------------------------------------------------------- through the engine

def sisa_experiment():
    return micro(models={"base": {}}, undo__after="none", attacks=[], unlearn__methods=[{
        "method": "sisa", "options": {"shards": 2, "slices": 2, "evaluate_before": False,
                                      "slice_train": {**TRAIN, "steps": 2}}}])


def test_the_graph_chains_each_shards_slice_models_as_auxiliary_stages():
    graph = build_graph(sisa_experiment())
    aux = {n.name: n for n in graph.nodes.values() if n.kind == "aux"}
    assert sorted(aux) == [aux_name(i, r) for i in range(2) for r in range(2)]
    for i in range(2):
        assert aux[aux_name(i, 0)].inputs == {"model": "seed0/base"}
        assert aux[aux_name(i, 1)].inputs == {"model": aux[aux_name(i, 0)].id}  # slice 1 continues slice 0
        assert aux[aux_name(i, 1)].params["spec"]["slice"] == [1, 2]
    assert graph.nodes["seed0/unlearn/sisa"].inputs["aux:" + aux_name(1, 1)] == aux[aux_name(1, 1)].id


def test_the_unlearn_stage_saves_a_loadable_ensemble_and_records_the_retraining(tmp_path):
    run_experiment(sisa_experiment(), tmp_path)
    result = json.loads((tmp_path / "seed0" / "unlearn" / "sisa" / "result.json").read_text())
    sisa = result["method_report"]["sisa"]
    assert result["flops"] == sisa["retrain"]["flops"] > 0
    assert sisa["retrain"]["flops"] <= sisa["full_retrain"]["flops"]
    model, _ = load_model(tmp_path / "seed0" / "unlearn" / "sisa" / "model")
    assert isinstance(model, EnsembleForCausalLM) and len(model.members) == 2
    assert result["metrics"]  # the task evaluated the ensemble


def test_shards_split_distinct_examples_so_every_copy_of_a_repeated_one_shares_a_shard():
    canary, other = Example("", "my PIN is 1 2 3 4"), Example("", "my PIN is 9 9 9 9")
    examples = [canary] * 16 + [other] * 4 + [Example("", f"doc {i}") for i in range(10)]
    shards = [shard_examples(examples, (i, 4), seed=3) for i in range(4)]
    assert sorted(map(len, shards)) != [len(examples) // 4] * 4  # copies are not dealt out one by one
    assert sum(map(len, shards)) == len(examples)  # disjoint and complete, copies included
    assert [sum(ex == canary for ex in s) for s in shards].count(16) == 1
    assert [sum(ex == other for ex in s) for s in shards].count(4) == 1
    assert [len(set(s)) for s in shards] == [3, 3, 3, 3]  # 12 distinct examples, 3 per shard
