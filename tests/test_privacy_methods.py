"""DEPN and the leave-one-out ensemble, the privacy task's neuron-editing and ensemble methods.

Attributions and targets are checked against values worked out by hand (a toy MLP's
integrated gradients, the mean of the teachers' softmaxes), the hooks against the
completeness of integrated gradients on every architecture, and both methods' behaviour on
the tiny Llama of test_privacy that memorises the tiny privacy task.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, OPTConfig, OPTForCausalLM

from test_arch import arch_configs
from test_privacy import BigramLM, memorised, tiny_llama, train_on_rows  # noqa: F401 (memorised: a fixture)
from undo import arch
from undo.config import from_dict
from undo.data import aux_examples, pad_batch
from undo.errors import UndoError
from undo.losses import forward_kl, scored_positions
from undo.methods import build_method
from undo.methods.depn import (integrated_gradients, kept_neurons, mlp_activations, most_frequent,
                               replaced_activation, token_attributions, zero_neurons)
from undo.methods.knowledge_unlearning import distinct_rows
from undo.methods.loo_ensemble import leave_out_logprobs, never_saw, shard_holders
from undo.metrics import masked_ce
from undo.stages.unlearn import build_streams
from undo.tasks.base import Example
from undo.training import TrainConfig, train

IGNORE = -100


# ---------------------------------------------------------------- DEPN: attributions by hand


def test_integrated_gradients_of_a_toy_mlp_match_the_riemann_sum_by_hand():
    # a = relu(W1 u); two classes, P(gold) = sigmoid(v . a) with v = W2[gold] - W2[other]
    w1 = torch.tensor([[1.0, -0.5], [0.3, 0.8], [-1.0, 0.2]])
    w2 = torch.tensor([[0.7, -1.2, 0.4], [-0.3, 0.5, 0.9]])
    a = torch.relu(w1 @ torch.tensor([1.5, 2.0]))          # [1.5 - 1, 0.45 + 1.6, 0] = [0.5, 2.05, 0]
    prob = lambda x, index: torch.softmax(x @ w2.T, -1)[:, 0]  # noqa: E731
    m, v = 20, (w2[0] - w2[1]).tolist()
    z = sum(vi * ai for vi, ai in zip(v, a.tolist()))
    slope = sum(sig(k / m * z) * (1 - sig(k / m * z)) for k in range(1, m + 1)) / m
    want = [ai * vi * slope for ai, vi in zip(a.tolist(), v)]
    got = integrated_gradients(prob, a[None], m, batch=7)  # 7: the points come in three batches
    assert got[0].tolist() == pytest.approx(want, rel=1e-5)
    assert got[0, 2].item() == 0.0  # a silent neuron gets nothing
    fine = integrated_gradients(prob, a[None], 4000, batch=4096)
    assert fine.sum().item() == pytest.approx(sig(z) - 0.5, abs=2e-4)  # completeness: P(a) - P(0)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kept_neurons_and_the_most_frequent_by_hand():
    scores = torch.tensor([[[1.0, 0.05, 0.2], [0.09, -3.0, 0.5]],     # token 1: max 1.0, keeps >= 0.1
                           [[0.0, 0.3, 0.0], [0.0, 0.02, 0.0]]])      # token 2: max 0.3, keeps >= 0.03
    assert kept_neurons(scores, 0.1, "token").tolist() == [[True, True, True], [False, False, True]]
    # summed: [[1.0, 0.35, 0.2], [0.09, -2.98, 0.5]], max 1.0
    assert kept_neurons(scores, 0.1, "document").tolist() == [[True, True, True], [False, False, True]]
    assert kept_neurons(scores, 0.4, "document").tolist() == [[True, False, False], [False, False, True]]
    assert not kept_neurons(-scores.abs(), 0.1, "token").any()  # no positive attribution: nothing kept
    counts = torch.tensor([[2, 0, 1], [2, 1, 0]])
    totals = torch.tensor([[0.5, 9.0, 0.1], [0.7, 0.2, 0.0]])
    assert most_frequent(counts, totals, 3) == [(1, 0), (0, 0), (1, 1)]  # ties: the larger total first
    assert most_frequent(counts, totals, 10) == [(1, 0), (0, 0), (1, 1), (0, 2)]  # only kept neurons


# ---------------------------------------------------------------- DEPN: hooks on every architecture


def random_model(name: str):
    config = arch_configs(40)[name]
    config.initializer_range = 0.1  # larger weights: the MLPs move the next-token probabilities visibly
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("name", ["llama", "gemma2", "qwen2", "gpt2"])
def test_attributions_are_complete_and_zeroed_neurons_are_silent_on_every_architecture(name):
    model = random_model(name)
    ids, targets = torch.tensor([3, 17, 5, 29, 8, 11]), torch.tensor([2, 5])
    with torch.enable_grad():
        scores = token_attributions(model, ids, targets, steps=1000, batch=4096)
    d_ff = mlp_activations(model, ids[None], torch.ones(1, 6, dtype=torch.long))[0].shape[-1]
    assert scores.shape == (2, arch.num_layers(model), d_ff)
    # completeness per layer: sum IG = P(a) - P(the layer's a = 0). Not on Gemma-2, whose MLP output
    # passes a post-norm: P is the same for every (k/m) a with k > 0 and jumps at a = 0.
    for n, t in enumerate(targets.tolist() if name != "gemma2" else []):
        for layer in range(arch.num_layers(model)):
            with torch.no_grad():
                full = next_token_prob(model, ids[:t + 1], t)
                with replaced_activation(model, layer, torch.tensor([t - 1]), torch.zeros(1, d_ff)):
                    zeroed = next_token_prob(model, ids[:t + 1], t)
            assert abs(full - zeroed) > 1e-4
            assert scores[n, layer].sum().item() == pytest.approx(full - zeroed, rel=0.02, abs=1e-6)
    neurons = [(0, 1), (arch.num_layers(model) - 1, 7)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    zero_neurons(model, neurons)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"{arch.spec(model).layers}.{layer}.{arch.spec(model).mlp_down}.weight" for layer, _ in neurons}
    assert_silent(model, ids[None], neurons)


def next_token_prob(model, ids: torch.Tensor, t: int) -> float:
    return model(input_ids=ids[None]).logits[0, t - 1].softmax(-1)[ids[t]].item()


def assert_silent(model, ids: torch.Tensor, neurons) -> None:
    """Pushing the zeroed neurons' activations anywhere leaves the logits exactly as they were."""
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        hooks = []
        for layer, index in neurons:
            def push(module, args, index=index):
                x = args[0].clone()
                x[..., index] += 100.0
                return (x,)
            hooks.append(arch.mlp_down(model, layer).register_forward_pre_hook(push))
        pushed = model(input_ids=ids).logits
        for h in hooks:
            h.remove()
    assert torch.equal(plain, pushed)


def test_depn_names_an_architecture_it_cannot_edit():
    config = OPTConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                       word_embed_proj_dim=16, max_position_embeddings=32)
    model = OPTForCausalLM(config).eval()
    with pytest.raises(UndoError, match="architecture 'opt'"):
        zero_neurons(model, [(0, 1)])


def test_depn_options_and_needs():
    depn = build_method("depn", {}, "privacy")
    o = depn.options
    assert (o.ig_steps, o.threshold, o.threshold_on, o.neurons) == (20, 0.1, "token", 20)
    assert depn.needs() == {"forget", "spans"} and depn.train_defaults["steps"] == 0
    for bad, match in (({"threshold": 0}, "threshold"), ({"fraction": 1.0}, "fraction"), ({"ig_steps": 0}, "ig_steps")):
        with pytest.raises(UndoError, match=match):
            build_method("depn", bad)
    with pytest.raises(UndoError, match="steps to 0"):
        depn.loss(None, {})


# ---------------------------------------------------------------- DEPN: behaviour


def span_and_retain_ce(model, forget_rows, retain_rows) -> tuple[float, float]:
    """(CE of the forget documents' sensitive tokens, CE of the retain sequences)."""
    with torch.no_grad():
        logits = model(input_ids=forget_rows["input_ids"], attention_mask=forget_rows["attention_mask"]).logits
        span_labels = forget_rows["labels"].masked_fill(~forget_rows["sensitive"].bool(), IGNORE)
        retain = model(input_ids=retain_rows["input_ids"], attention_mask=retain_rows["attention_mask"]).logits
    return masked_ce(logits, span_labels).item(), masked_ce(retain, retain_rows["labels"]).item()


def test_depn_zeroes_privacy_neurons_and_forgets_spans_more_than_retain_text(memorised):
    task, tok, base = memorised
    model = copy.deepcopy(base)
    method = build_method("depn", {"neurons": 25}, "privacy")  # of 2 x 128
    cfg = from_dict(TrainConfig, {**method.train_defaults, "batch_size": 4, "checkpoint_every": 0})
    streams = build_streams(task, tok, method, cfg, 0)
    forget_rows = distinct_rows(streams["forget"]).rows
    retain_rows = pad_batch(tok, sorted(set(task.train_examples("retain")), key=lambda e: e.completion), "all")
    before = span_and_retain_ce(model, forget_rows, retain_rows)
    result = train(model, method.loss, streams, cfg, seed=0, on_start=method.start, on_end=method.finish)
    assert result.steps == 0 and len(method.erased) == 25
    for layer, index in method.erased:
        assert arch.mlp_down(model, layer).weight[:, index].abs().sum() == 0
    assert_silent(model, forget_rows["input_ids"][:2], method.erased)
    after = span_and_retain_ce(model, forget_rows, retain_rows)
    span_rise, retain_rise = after[0] - before[0], after[1] - before[1]
    assert span_rise > 0.1 and span_rise > 2 * retain_rise  # measured: +0.12 vs +0.03
    # the same number of neurons chosen without the attribution hurts the spans far less (measured: +0.003)
    other = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    chosen = set(method.erased)
    pairs = [(layer, i) for layer in range(2) for i in range(128)]
    spare = [pairs[j] for j in torch.randperm(len(pairs), generator=g).tolist() if pairs[j] not in chosen][:25]
    zero_neurons(other, spare)
    assert span_and_retain_ce(other, forget_rows, retain_rows)[0] - before[0] < span_rise / 4


# ---------------------------------------------------------------- leave-one-out: targets by hand


def test_the_target_is_the_mean_of_the_softmaxes_of_the_teachers_that_never_saw_it():
    g = torch.Generator().manual_seed(0)
    teachers = [torch.randn(2, 2, 3, generator=g) for _ in range(3)]
    use = torch.tensor([[False, True, True], [True, False, False]])
    log_q = leave_out_logprobs(teachers, use)
    p = [t.softmax(-1) for t in teachers]
    assert torch.allclose(log_q[0].exp(), (p[1][0] + p[2][0]) / 2, atol=1e-6)
    assert torch.allclose(log_q[1].exp(), p[0][1], atol=1e-6)
    assert torch.equal(leave_out_logprobs(teachers, torch.zeros(2, 3, dtype=torch.bool)), torch.zeros(2, 2, 3))


def test_loo_loss_is_the_kl_from_the_leave_out_mean_by_hand():
    method = build_method("loo_ensemble", {"teachers": 3}, "privacy")
    method.aux = {f"teacher{j}": TableLM(seed=j + 1) for j in range(3)}
    method.use = never_saw([frozenset({0}), frozenset({1, 2})], 3)  # example 0: teachers 1, 2; example 1: teacher 0
    batch = {"input_ids": torch.tensor([[1, 2, 3], [4, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
             "labels": torch.tensor([[IGNORE, 2, 3], [IGNORE, 0, IGNORE]]), "example": torch.tensor([[1], [0]])}
    student = TableLM(seed=0)
    out = method.loss(student, {"forget": batch})
    table = {j: method.aux[f"teacher{j}"].table.detach().softmax(-1) for j in range(3)}
    s = student.table.detach().log_softmax(-1)
    kl = lambda q, prev: (q * (q.log() - s[prev])).sum().item()  # noqa: E731
    # row 0 is example 1 (teacher 0 alone): positions after 1 and 2; row 1 is example 0 (teachers 1, 2): after 4
    want = (kl(table[0][1], 1) + kl(table[0][2], 2) + kl((table[1][4] + table[2][4]) / 2, 4)) / 3
    assert out.loss.item() == pytest.approx(want, rel=1e-5)
    assert out.extra_flops > 0 and out.logs["loo_kl"] == pytest.approx(want, rel=1e-5)


class TableLM(BigramLM):
    """BigramLM with the embedding accessors `frozen_logits` counts FLOPs by (no embedding: all table)."""

    def get_input_embeddings(self):
        return torch.nn.Embedding(1, 1)

    def get_output_embeddings(self):
        return None


def test_shard_holders_by_hand():
    a, b, c = Example("", "a"), Example("", "b"), Example("", "c")
    holders = shard_holders([a, a, b, c], [[a, b], [a], []])
    assert holders == [frozenset({0, 1}), frozenset({0, 1}), frozenset({0}), frozenset()]
    assert never_saw(holders, 3).tolist() == [[False, False, True], [False, False, True], [False, True, True],
                                              [True, True, True]]


def test_loo_knows_which_teacher_saw_each_forget_row(memorised):
    task, tok, model = memorised
    method = build_method("loo_ensemble", {"teachers": 3}, "privacy", seed=0)
    method.bind_task(task, tok)
    forget = task.train_examples("forget")
    for ex, held in zip(forget, method.holders):  # the aux stage's own shards, asked again
        assert held == {j for j in range(3) if ex in aux_examples(task, "all", (j, 3), 0)}
    documents = [h for ex, h in zip(forget, method.holders) if forget.count(ex) == 1]
    assert documents and all(len(h) == 1 for h in documents)  # a document lives in one shard
    cfg = from_dict(TrainConfig, {**method.train_defaults, "batch_size": 4})
    streams = build_streams(task, tok, method, cfg, 0)
    method.start(model, streams)
    rows = streams["forget"].rows
    for ids, example in zip(rows["input_ids"], rows["example"][:, 0].tolist()):
        alone = pad_batch(tok, [forget[example]], "all")["input_ids"][0]
        assert ids[:len(alone)].tolist() == alone.tolist() and (ids[len(alone):] == tok.pad_token_id).all()
        assert method.use[example].any()
    assert len({ex.completion for ex in forget}) >= streams["forget"].n >= 2  # distinct, and the seen-by-all left out


def test_loo_ensemble_declares_its_teachers_as_auxiliary_stages():
    from undo.engine.graph import build_graph
    from undo.experiment import ExperimentConfig, load_raw

    raw = load_raw("privacy-quick")
    raw["unlearn"]["methods"] = [{"method": "loo_ensemble", "options": {"teachers": 3,
                                                                        "teacher_train": {"steps": 50}}}]
    raw["undo"]["after"] = "none"
    graph = build_graph(from_dict(ExperimentConfig, raw))
    aux = sorted((n for n in graph.nodes.values() if n.kind == "aux"), key=lambda n: n.name)
    assert [n.name for n in aux] == ["teacher0", "teacher1", "teacher2"]
    assert [n.params["spec"] for n in aux] == [{"start": "random", "data": "all", "shard": [i, 3]} for i in range(3)]
    assert all(n.params["train"]["steps"] == 50 for n in aux)
    assert graph.nodes["seed0/unlearn/loo_ensemble"].inputs == {"model": "seed0/base",
                                                                **{f"aux:{n.name}": n.id for n in aux}}
    with pytest.raises(UndoError, match="teachers must be at least 2"):
        build_method("loo_ensemble", {"teachers": 1})


# ---------------------------------------------------------------- leave-one-out: behaviour


def train_teacher(task, tok, shard, seed: int):
    """A tiny Llama from scratch on one shard of the aux stage's data (as the engine trains a teacher)."""
    model = tiny_llama(tok, seed=seed).train()
    rows = pad_batch(tok, aux_examples(task, "all", shard, 0), "all", max_len=128)
    return train_on_rows(model, rows, steps=120, seed=seed).eval().requires_grad_(False)


def test_loo_moves_the_forget_distribution_toward_the_teachers_that_never_saw_it(memorised):
    task, tok, base = memorised
    model = copy.deepcopy(base)
    method = build_method("loo_ensemble", {"teachers": 2}, "privacy", seed=0)
    method.aux = {f"teacher{j}": train_teacher(task, tok, (j, 2), seed=j + 1) for j in range(2)}
    method.bind_task(task, tok)
    cfg = from_dict(TrainConfig, {**method.train_defaults, "steps": 15, "lr": 1e-3, "batch_size": 4,
                                  "checkpoint_every": 0})
    streams = build_streams(task, tok, method, cfg, 0)
    method.start(model, streams)
    rows = streams["forget"].rows
    target_ce, kl_before, ce_before = loo_view(method, model, rows)
    train(model, method.loss, streams, cfg, seed=0)
    _, kl_after, ce_after = loo_view(method, model, rows)
    assert target_ce > ce_before + 1.0          # the teachers that never saw a sequence do not know it
    assert kl_after < kl_before / 2
    assert abs(ce_after - target_ce) < abs(ce_before - target_ce) / 2 and ce_after > ce_before


def loo_view(method, model, rows) -> tuple[float, float, float]:
    """(CE of the leave-out target on the forget tokens, KL(target || model), the model's CE)."""
    with torch.no_grad():
        use = method.use[rows["example"][:, 0]]
        teachers = [method.aux[f"teacher{j}"](input_ids=rows["input_ids"],
                                              attention_mask=rows["attention_mask"]).logits for j in range(2)]
        log_q = leave_out_logprobs(teachers, use)
        logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
        mask = scored_positions(rows["labels"])
        return (masked_ce(log_q, rows["labels"]).item(), forward_kl(log_q, logits, mask).item(),
                masked_ce(logits, rows["labels"]).item())
