"""EUL (unlearning layers): its two losses by hand on tiny tensors, fusion's closed form on a
linear toy whose answer is known, the adapters as peft checkpoints and merged into the weights,
the alternating retain/forget phases, and the behaviour on a tiny model briefly pretrained on a
small world of fictitious people (test_facts' RAW): forget answers fall, retain answers stay,
and with two deletion requests the fused model is a plain HF model."""

import math

import pytest
import torch

from test_facts import log_softmax
from test_facts_methods import world  # noqa: F401  (the pretrained tiny world fixture)
from undo.data import IGNORE, BatchStream
from undo.errors import UndoError
from undo.facts_metrics import completion_nlls
from undo.methods import build_method
from undo.methods.eul import (EULOptions, PhaseStream, adapter_input_grams, adapter_map, adapted_layers,
                              add_unlearning_layers, forget_step_loss, fuse_linear_maps, merge_unlearning_layers,
                              retain_step_loss)
from undo.models import load_model
from undo.stages.unlearn import build_streams
from undo.training import TrainConfig, train


# ---------------------------------------------------------------- the losses by hand

def test_retain_and_forget_step_losses_on_a_tiny_tensor():
    # one row, three positions, vocabulary 2; labels score tokens 1 and 2 (positions 0 and 1 predict them)
    student = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [5.0, 5.0]]])
    base = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [9.0, 0.0]]])
    labels = torch.tensor([[IGNORE, 1, 0]])

    def kl(p, q):
        lp, lq = log_softmax(p), log_softmax(q)
        return sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))

    kl_mean = (kl([1.0, 0.0], [0.0, 1.0]) + kl([0.0, 0.0], [2.0, 0.0])) / 2  # position 2 predicts nothing
    ce = -(log_softmax([0.0, 1.0])[1] + log_softmax([2.0, 0.0])[0]) / 2
    o = EULOptions()  # a = 0.8, l = 1, g = 0.2
    retain, logs = retain_step_loss(student, base, labels, o)
    assert retain.item() == pytest.approx(0.8 * kl_mean + 1.0 * ce, rel=1e-6)
    assert logs == pytest.approx({"retain_kl": kl_mean, "retain_ce": ce}, rel=1e-6)
    forget, _ = forget_step_loss(student, base, labels, o)
    assert forget.item() == pytest.approx(-kl_mean - 0.2 * ce, rel=1e-6)
    # the base itself: no divergence, only the data terms remain
    assert retain_step_loss(base, base, labels, o)[0].item() == pytest.approx(masked_ce_by_hand(base, labels))


def masked_ce_by_hand(logits, labels):
    rows = logits[0].tolist()
    return -(log_softmax(rows[0])[1] + log_softmax(rows[1])[0]) / 2


# ---------------------------------------------------------------- fusion's closed form on a linear toy

def test_fusion_is_the_least_squares_map_over_every_request():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(20, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    ws = [torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    fused = fuse_linear_maps([x.T @ x for x in xs], ws)
    # the same W from the stacked system [X_1; X_2; X_3] W = [X_1 W_1; X_2 W_2; X_3 W_3], solved another way
    stacked = torch.linalg.lstsq(torch.cat(xs), torch.cat([x @ w for x, w in zip(xs, ws)])).solution
    assert torch.allclose(fused, stacked, atol=1e-10)
    # identical maps fuse to that map; one request's map is its own
    assert torch.allclose(fuse_linear_maps([x.T @ x for x in xs], [ws[0]] * 3), ws[0], atol=1e-10)
    assert torch.allclose(fuse_linear_maps([xs[1].T @ xs[1]], [ws[1]]), ws[1], atol=1e-10)


def test_fusion_of_requests_on_disjoint_inputs_keeps_each_map_on_its_own_data():
    # request 1's inputs live on coordinates 0-1, request 2's on 2-4: the fused map answers
    # each request's inputs exactly as that request's map does (rows 0-1 from W_1, 2-4 from W_2)
    g = torch.Generator().manual_seed(1)
    x1 = torch.zeros(10, 5, dtype=torch.float64)
    x1[:, :2] = torch.randn(10, 2, generator=g, dtype=torch.float64)
    x2 = torch.zeros(10, 5, dtype=torch.float64)
    x2[:, 2:] = torch.randn(10, 3, generator=g, dtype=torch.float64)
    w1, w2 = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(2))
    fused = fuse_linear_maps([x1.T @ x1, x2.T @ x2], [w1, w2])
    assert torch.allclose(x1 @ fused, x1 @ w1, atol=1e-10) and torch.allclose(x2 @ fused, x2 @ w2, atol=1e-10)
    assert torch.allclose(fused[:2], w1[:2], atol=1e-10) and torch.allclose(fused[2:], w2[2:], atol=1e-10)
    # a plain average would not: the closed form weighs each map by where its data lives
    assert not torch.allclose(x1 @ ((w1 + w2) / 2), x1 @ w1, atol=1e-3)
    # RegMean's shrinkage: one request still gets its own map back; fully shrunk (s = 1, diagonals only),
    # each input coordinate k's row is the average of the W_i[k] weighted by the inputs' energy sum_t X_i[t, k]^2
    x3 = torch.randn(10, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(fuse_linear_maps([x3.T @ x3], [w1], shrink=0.5), w1, atol=1e-10)
    e1, e2 = (x1 ** 2).sum(0), (x3 ** 2).sum(0)
    by_hand = torch.stack([(e1[k] * w1[k] + e2[k] * w2[k]) / (e1[k] + e2[k]) for k in range(5)])
    assert torch.allclose(fuse_linear_maps([x1.T @ x1, x3.T @ x3], [w1, w2], shrink=1.0), by_hand, atol=1e-10)
    with pytest.raises(UndoError, match="one Gram matrix per map"):
        fuse_linear_maps([x1.T @ x1], [w1, w2])


# ---------------------------------------------------------------- adapters: peft checkpoints, merged, fused

def with_random_adapters(model, requests: int, seed: int):
    """`model` with unlearning layers whose B matrices are random (fresh ones compute nothing)."""
    peft_model = add_unlearning_layers(model, rank=4, alpha=8.0, requests=requests, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return peft_model


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft reads the deprecated name
def test_adapters_sit_on_each_mlp_output_save_as_peft_checkpoints_and_merge_into_the_weights(world, tmp_path):
    from peft import PeftModel

    ids = torch.tensor([[1, 5, 9, 12, 7, 3]])
    base, _ = load_model(world.dir)
    plain_logits = base(input_ids=ids).logits
    peft_model = with_random_adapters(base, requests=1, seed=0)
    layers = adapted_layers(peft_model)
    assert len(layers) == base.config.num_hidden_layers and all("mlp.down_proj" in n for n, m in
                                                                peft_model.named_modules() if m in layers)
    assert all(("lora_" in n) == p.requires_grad for n, p in peft_model.named_parameters())  # base frozen
    adapted = peft_model(input_ids=ids).logits
    assert not torch.allclose(adapted, plain_logits, atol=1e-4)
    peft_model.save_pretrained(tmp_path / "adapters")  # a peft checkpoint: config + weights, per adapter
    saved = tmp_path / "adapters" / "request0"
    assert (saved / "adapter_config.json").exists() and (saved / "adapter_model.safetensors").exists()
    fresh, _ = load_model(world.dir)
    loaded = PeftModel.from_pretrained(fresh, saved, adapter_name="request0")
    assert torch.allclose(loaded(input_ids=ids).logits, adapted, atol=1e-5)
    merged = merge_unlearning_layers(loaded)
    assert type(merged).__name__ == "LlamaForCausalLM" and not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-4)


def test_fusing_two_copies_of_one_adapter_gives_that_adapter_merged(world):
    base, tok = load_model(world.dir)
    rows = {"input_ids": torch.tensor([[1, 5, 9, 12, 7, 3], [1, 4, 8, 2, 0, 0]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])}
    peft_model = with_random_adapters(base, requests=2, seed=0)
    with torch.no_grad():  # request1 := request0, on different data
        params = dict(peft_model.named_parameters())
        for name, p in params.items():
            if ".request1." in name:
                p.copy_(params[name.replace(".request1.", ".request0.")])
    peft_model.set_adapter("request0")
    expected = peft_model(input_ids=rows["input_ids"][:1]).logits
    grams = {"request0": adapter_input_grams(peft_model, "request0", {k: v[:1] for k, v in rows.items()}, 4),
             "request1": adapter_input_grams(peft_model, "request1", {k: v[1:] for k, v in rows.items()}, 4)}
    assert grams["request0"][0].shape == (base.config.intermediate_size,) * 2
    layer = adapted_layers(peft_model)[0]
    assert adapter_map(layer, "request0").shape == (base.config.intermediate_size, base.config.hidden_size)
    fused = merge_unlearning_layers(peft_model, grams, shrink=0.1)
    assert torch.allclose(fused(input_ids=rows["input_ids"][:1]).logits, expected, atol=1e-4)
    with pytest.raises(UndoError, match="Gram matrices"):
        merge_unlearning_layers(with_random_adapters(load_model(world.dir)[0], 2, 0))


# ---------------------------------------------------------------- alternating phases

def stream(n: int, batch_size: int, seed: int, first: int) -> BatchStream:
    ids = torch.arange(first, first + n)[:, None].repeat(1, 3)
    return BatchStream({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}, batch_size, seed)


def test_phases_alternate_a_retain_epoch_and_a_forget_epoch_per_request():
    retain, parts = stream(6, 2, 0, 100), [stream(2, 2, 1, 0), stream(4, 2, 2, 10)]
    phases = PhaseStream(retain, parts, every=0)
    # per request: a retain epoch (3 batches), then its forget part's epoch (1, then 2 batches)
    assert phases.cycle == [(0, 0)] * 3 + [(1, 0)] + [(0, 1)] * 3 + [(2, 1)] * 2
    batches = [phases.batch(s) for s in range(len(phases.cycle) * 2)]
    assert [int(b["forget"][0, 0]) for b in batches[:9]] == [0, 0, 0, 1, 0, 0, 0, 1, 1]
    assert [int(b["request"][0, 0]) for b in batches[:9]] == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    # each source is read in its own order with no batch skipped: retain's first 12 batches, in order
    retain_ids = [b["input_ids"][:, 0].tolist() for b, (s, _) in zip(batches, phases.cycle * 2) if s == 0]
    assert retain_ids == [retain.batch(k)["input_ids"][:, 0].tolist() for k in range(12)]
    assert all(0 <= i < 2 for b in batches if int(b["request"][0, 0]) == 0 and int(b["forget"][0, 0])
               for i in b["input_ids"][:, 0].tolist())
    assert PhaseStream(retain, parts[:1], every=2).cycle == [(0, 0), (0, 0), (1, 0), (1, 0)]


# ---------------------------------------------------------------- behaviour on a tiny model

def answer_probability(model, tok, task, domain: str) -> float:
    pairs = [(ex.prompt, ex.completion) for ex in task.train_examples(domain) if ex.prompt]
    return sum(math.exp(-x) for x in completion_nlls(model, tok, pairs)) / len(pairs)


def unlearn(world, options: dict, steps: int, lr: float = 3e-3):
    """EUL on the world's base, as the unlearn stage runs it (adapt, streams, start, train, export)."""
    model, tok = load_model(world.dir)
    method = build_method("eul", options, "facts")
    cfg = TrainConfig(steps=steps, lr=lr, batch_size=8, seq_len=64, schedule="constant", checkpoint_every=0)
    method.bind_task(world.task, tok)
    model = method.adapt(model)
    params = method.trainable_parameters(model)
    streams = build_streams(world.task, tok, method, cfg, 0)
    result = train(model, method.loss, streams, cfg, seed=0, params=params, on_start=method.start)
    return method.export(model), tok, result, method


def test_eul_lowers_the_forget_answers_and_keeps_the_retain_ones(world):
    base, tok = load_model(world.dir)
    model, tok, result, method = unlearn(world, {"alternate_every": 2}, steps=30)
    assert type(model).__name__ == "LlamaForCausalLM" and not any("lora" in n for n, _ in model.named_parameters())
    before = {d: answer_probability(base, tok, world.task, d) for d in ("forget", "retain")}
    after = {d: answer_probability(model, tok, world.task, d) for d in ("forget", "retain")}
    assert after["forget"] < 0.6 * before["forget"], (before, after)    # 0.91 -> 0.42 here
    assert after["retain"] > 0.75 * before["retain"], (before, after)   # 0.94 -> 0.81
    # the frozen base's forward passes are counted: more than the 6 N T of the trained model alone
    assert result.flops > 6 * sum(p.numel() for n, p in base.named_parameters() if "embed" not in n) * result.tokens


def test_two_deletion_requests_train_two_adapters_and_fuse_them(world):
    base, tok = load_model(world.dir)
    model, tok, result, method = unlearn(world, {"requests": 2, "alternate_every": 1}, steps=30, lr=6e-3)
    assert method.row_format == "padded" and len(method.parts) == 2
    assert sum(p.n for p in method.parts) == len(world.task.train_examples("forget"))
    assert type(model).__name__ == "LlamaForCausalLM" and not any("lora" in n for n, _ in model.named_parameters())
    report = method.report()
    assert report["requests"] == 2 and report["flops"] > 0 and report["tokens"] > 0
    before = {d: answer_probability(base, tok, world.task, d) for d in ("forget", "retain")}
    after = {d: answer_probability(model, tok, world.task, d) for d in ("forget", "retain")}
    assert after["forget"] < 0.7 * before["forget"], (before, after)  # the fused adapters still forget: 0.91 -> 0.41
    # and the fusion kept the rest: 0.94 -> 0.70 (on facts-quick the bare closed form, fusion_shrink 0, took
    # model utility to 0)
    assert after["retain"] > 0.6 * before["retain"], (before, after)


def test_options_are_checked():
    with pytest.raises(UndoError, match="requests must be at least 1"):
        build_method("eul", {"requests": 0})
    with pytest.raises(UndoError, match="forget_lm_weight must be >= 0"):
        build_method("eul", {"forget_lm_weight": -1.0})
    assert build_method("eul").needs() == {"forget", "retain"}  # no reference copy: the base is the teacher
