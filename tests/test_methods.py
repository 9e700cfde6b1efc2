"""Methods: each loss against a hand computation, the registry, RMU's layers, SAM's step.

Most losses use a bigram "language model" (logits at a position = a row of a table indexed
by the current token), so expected values are sums over table rows written out in plain
Python. RMU and RepNoise need a real decoder and use a 4-layer Llama with 16 hidden units.
"""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from undo import arch
from undo.errors import UndoError
from undo.losses import gaussian_mmd
from undo.methods import build_method, known_methods, method_class, resolve_options
from undo.methods.base import NEEDS
from undo.experiment import Recipe as MethodRun, UnlearnConfig
from undo.methods.rmu import default_layers
from undo.stages.select import select_teacher


def sweep_runs(recipe, sweep):
    return recipe.points(sweep)
from undo.models import non_embedding_params

IGNORE = -100
V = 6


class BigramLM(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]; the table is the (tied) embedding."""

    def __init__(self, seed: int, vocab: int = V):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, vocab)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, vocab, generator=g) * 1.5)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.embed(input_ids))

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.embed

    def table(self):
        return self.embed.weight.detach().tolist()


# Forget: row 0 has a 2-token prompt (unscored) and 2 answer tokens; row 1 has padding (id 0) at the end.
FORGET = {"input_ids": torch.tensor([[1, 2, 3, 4, 5], [1, 4, 4, 0, 0]]),
          "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
          "labels": torch.tensor([[IGNORE, IGNORE, IGNORE, 4, 5], [IGNORE, 4, 4, IGNORE, IGNORE]])}
RETAIN = {"input_ids": torch.tensor([[1, 3, 2, 2], [1, 5, 0, 0]]),
          "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
          "labels": torch.tensor([[IGNORE, 3, 2, 2], [IGNORE, 5, IGNORE, IGNORE]])}
# The same prompts as FORGET with another answer (IdkDPO's preferred rows).
IDK = {"input_ids": torch.tensor([[1, 2, 3, 2, 0], [1, 2, 0, 0, 0]]),
       "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]),
       "labels": torch.tensor([[IGNORE, IGNORE, IGNORE, 2, IGNORE], [IGNORE, 2, IGNORE, IGNORE, IGNORE]])}


def log_softmax(row):
    m = max(row)
    z = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - z for x in row]


def scored(b):
    """(row, position, next label) for every scored prediction."""
    ids, labels = b["input_ids"].tolist(), b["labels"].tolist()
    return [(r, t, labels[r][t + 1]) for r in range(len(ids)) for t in range(len(ids[r]) - 1)
            if labels[r][t + 1] != IGNORE]


def hand_ce(table, b):
    ids = b["input_ids"].tolist()
    vals = [-log_softmax(table[ids[r][t]])[y] for r, t, y in scored(b)]
    return sum(vals) / len(vals)


def hand_seq_logp(table, b):
    ids = b["input_ids"].tolist()
    out = [0.0] * len(ids)
    for r, t, y in scored(b):
        out[r] += log_softmax(table[ids[r][t]])[y]
    return out


def hand_kl(p_table, q_table, b, positions):
    ids = b["input_ids"].tolist()
    vals = []
    for r, t in positions:
        lp, lq = log_softmax(p_table[ids[r][t]]), log_softmax(q_table[ids[r][t]])
        vals.append(sum(math.exp(a) * (a - c) for a, c in zip(lp, lq)))
    return sum(vals) / len(vals)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def loss_of(name, options=None, task=None, reference=None, teacher=None, batches=None):
    method = build_method(name, options or {}, task)
    method.attach(reference=reference, teacher=teacher)
    model = BigramLM(0)
    out = method.loss(model, batches or {"forget": FORGET, "retain": RETAIN, "idk": IDK})
    return method, model, out


# ---------------------------------------------------------------- hand-checked losses

def test_grad_ascent_is_negative_forget_ce():
    _, model, out = loss_of("grad_ascent")
    assert out.loss.item() == pytest.approx(-hand_ce(model.table(), FORGET), rel=1e-5)
    assert out.extra_flops == 0.0


def test_graddiff_nll_uses_the_arithmetic_retain_weight():
    method, model, out = loss_of("graddiff", task="arithmetic")
    assert method.options.retain_weight == 15.0 and "reference" not in method.needs()
    t = model.table()
    assert out.loss.item() == pytest.approx(-hand_ce(t, FORGET) + 15.0 * hand_ce(t, RETAIN), rel=1e-5)


def test_graddiff_kl_retain_term_is_masked_kl_to_the_reference():
    ref = BigramLM(1)
    method, model, out = loss_of("graddiff", {"retain_loss": "kl", "retain_weight": 2.0}, reference=ref)
    assert "reference" in method.needs()
    positions = [(r, t) for r, t, _ in scored(RETAIN)]
    expected = -hand_ce(model.table(), FORGET) + 2.0 * hand_kl(ref.table(), model.table(), RETAIN, positions)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    tokens = RETAIN["input_ids"].numel()
    assert out.extra_flops == 2.0 * V * V * tokens  # one reference forward on the retain batch


def test_maxent_is_kl_from_uniform_on_forget_plus_retain_ce():
    _, model, out = loss_of("maxent", {"forget_weight": 0.7, "retain_weight": 0.3})
    t, ids = model.table(), FORGET["input_ids"].tolist()
    kl_u = [sum((1 / V) * (math.log(1 / V) - lp) for lp in log_softmax(t[ids[r][p]])) for r, p, _ in scored(FORGET)]
    expected = 0.7 * sum(kl_u) / len(kl_u) + 0.3 * hand_ce(t, RETAIN)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_maxent_wmdp_variant_uses_kl_to_reference_on_retain():
    options = resolve_options("maxent", {}, "wmdp")
    assert (options.forget_weight, options.retain_weight, options.retain_loss) == (0.8, 0.2, "kl")


def test_npo_matches_hand_computation():
    ref = BigramLM(1)
    _, model, out = loss_of("npo", {"beta": 0.5, "retain_weight": 0.0}, reference=ref)
    logp, ref_logp = hand_seq_logp(model.table(), FORGET), hand_seq_logp(ref.table(), FORGET)
    rows = [log_sigmoid(-0.5 * (a - b)) for a, b in zip(logp, ref_logp)]
    assert out.loss.item() == pytest.approx(-(2 / 0.5) * sum(rows) / len(rows), rel=1e-5)


def test_simnpo_matches_hand_computation():
    _, model, out = loss_of("simnpo", {"delta": 0.5})
    t = model.table()
    logp = hand_seq_logp(t, FORGET)
    lengths = [2, 2]  # scored tokens per forget row
    rows = [log_sigmoid(4.5 * (-lp / n - 0.5)) for lp, n in zip(logp, lengths)]
    expected = 0.125 * (-(2 / 4.5) * sum(rows) / 2) + 1.0 * hand_ce(t, RETAIN)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_idkdpo_matches_hand_computation():
    ref = BigramLM(1)
    _, model, out = loss_of("idkdpo", {"retain_weight": 0.0}, reference=ref)
    t, r = model.table(), ref.table()
    win = [a - b for a, b in zip(hand_seq_logp(t, IDK), hand_seq_logp(r, IDK))]
    lose = [a - b for a, b in zip(hand_seq_logp(t, FORGET), hand_seq_logp(r, FORGET))]
    rows = [log_sigmoid(0.1 * (w - l)) for w, l in zip(win, lose)]
    assert out.loss.item() == pytest.approx(-(2 / 0.1) * sum(rows) / 2, rel=1e-5)
    assert out.extra_flops == 2.0 * V * V * (IDK["input_ids"].numel() + FORGET["input_ids"].numel())


def test_undial_matches_hand_computation():
    ref = BigramLM(1)
    _, model, out = loss_of("undial", {"beta": 3.0, "retain_weight": 0.0}, reference=ref)
    t, r, ids = model.table(), ref.table(), FORGET["input_ids"].tolist()
    vals = []
    for row, p, y in scored(FORGET):
        target = [z - (3.0 if v == y else 0.0) for v, z in enumerate(r[ids[row][p]])]
        q = [math.exp(x) for x in log_softmax(target)]
        vals.append(-sum(qi * li for qi, li in zip(q, log_softmax(t[ids[row][p]]))))
    assert out.loss.item() == pytest.approx(sum(vals) / len(vals), rel=1e-5)


def test_undial_lowers_the_true_token_without_a_one_hot(monkeypatch):
    """The targets are the one-hot formula's to the bit; the loss builds no one-hot and no
    float32 copy of the targets, and has the value and gradient of soft CE to those targets."""
    import torch.nn.functional as F

    from undo.losses import scored_positions, soft_cross_entropy
    from undo.methods.undial import undial_targets

    g = torch.Generator().manual_seed(0)
    ref_logits, labels = torch.randn(2, 5, V, generator=g) * 2, FORGET["labels"]
    one_hot = ref_logits.float().clone()
    penalty = F.one_hot(labels[:, 1:].clamp(min=0), V).to(one_hot.dtype) * 3.0
    one_hot[:, :-1] -= penalty * (labels[:, 1:] >= 0).unsqueeze(-1)
    assert torch.equal(undial_targets(ref_logits, labels, 3.0), one_hot)

    monkeypatch.setattr(F, "one_hot", lambda *a, **k: pytest.fail("UNDIAL built a one-hot"))
    ref = BigramLM(1)
    _, model, out = loss_of("undial", {"beta": 3.0, "retain_weight": 0.0}, reference=ref)
    out.loss.backward()
    other = BigramLM(0)
    with torch.no_grad():
        targets = undial_targets(ref(FORGET["input_ids"]).logits, labels, 3.0)
    explicit = soft_cross_entropy(targets, other(FORGET["input_ids"]).logits, scored_positions(labels))
    explicit.backward()
    assert torch.equal(out.loss.detach(), explicit.detach())
    assert torch.equal(model.embed.weight.grad, other.embed.weight.grad)


def test_oracle_matching_is_kl_from_teacher_at_positions_predicting_real_tokens():
    teacher = BigramLM(2)
    method, model, out = loss_of("oracle_matching", {"forget_weight": 1.0, "retain_weight": 0.5}, teacher=teacher)
    assert method.needs() == {"forget", "retain", "teacher"}
    t, o = model.table(), teacher.table()

    def real(b):  # position p counts when tokens p and p + 1 are both real (a row's last one does not)
        mask = b["attention_mask"].tolist()
        return [(r, p) for r in range(len(mask)) for p in range(len(mask[r]) - 1) if mask[r][p] and mask[r][p + 1]]

    expected = hand_kl(o, t, FORGET, real(FORGET)) + 0.5 * hand_kl(o, t, RETAIN, real(RETAIN))
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


class CountingLM(BigramLM):
    def __init__(self, seed: int):
        super().__init__(seed)
        self.rows = []  # rows of each forward

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.rows.append(input_ids.shape[0])
        return super().forward(input_ids, attention_mask)


JOINABLE = [("graddiff", {}, {}), ("graddiff", {"retain_loss": "kl"}, {"reference": 1}), ("maxent", {}, {}),
            ("npo", {}, {"reference": 1}), ("simnpo", {}, {}), ("undial", {}, {"reference": 1}),
            ("idkdpo", {}, {"reference": 1}), ("oracle_matching", {"retain_weight": 0.5}, {"teacher": 2})]


@pytest.mark.parametrize("name,options,frozen", JOINABLE)
def test_one_forward_for_forget_and_retain_where_joined(monkeypatch, name, options, frozen):
    """Joined (as on an accelerator): one forward of the trained model over forget + retain rows
    (+ idk), the narrower batch right-padded; the loss and gradient are the separate forwards'."""
    import undo.methods.base as base

    batches = {"forget": FORGET, "retain": RETAIN, "idk": IDK}
    results = {}
    for joined in (False, True):
        monkeypatch.setitem(base.JOINT_FORWARD, "cpu", joined)
        method = build_method(name, options)
        method.attach(**{role: CountingLM(seed) for role, seed in frozen.items()})
        model = CountingLM(0)
        out = method.loss(model, batches)
        out.loss.backward()
        results[joined] = (out, model.embed.weight.grad, model.rows)
    (sep, sep_grad, sep_rows), (joint, joint_grad, joint_rows) = results[False], results[True]
    assert len(sep_rows) >= 2 and len(joint_rows) == 1 and joint_rows[0] == sum(sep_rows)
    assert joint.loss.item() == pytest.approx(sep.loss.item(), rel=1e-6)
    assert torch.allclose(joint_grad, sep_grad, rtol=1e-5, atol=1e-7)
    assert joint.logs == pytest.approx(sep.logs, rel=1e-6) and joint.extra_flops == sep.extra_flops


def test_batches_of_very_different_widths_are_not_joined(monkeypatch):
    import undo.methods.base as base

    monkeypatch.setitem(base.JOINT_FORWARD, "cpu", True)
    wide = {k: torch.cat([v, v[:, 1:2].expand(-1, 20)], dim=1) for k, v in RETAIN.items()}  # 4 -> 24 tokens
    model = CountingLM(0)
    base.logits_of_each(model, [FORGET, wide])
    assert model.rows == [2, 2]


# ---------------------------------------------------------------- registry and options

def test_every_registered_method_builds_with_defaults():
    for name in known_methods():
        method = build_method(name)
        assert method.name == name and method.description
        # every method learns from some data: the forget set, (knowledge editing) the updated facts,
        # or (Quark) its own samples of the task's prompts
        assert method.needs() <= set(NEEDS) and method.needs() & {"forget", "update", "prompts"}
        assert method.row_format in ("packed", "padded")


def test_methods_that_need_no_reference_say_so():
    assert "reference" not in build_method("graddiff").needs()
    assert "reference" not in build_method("maxent").needs()
    assert "reference" not in build_method("simnpo").needs()
    assert "reference" not in build_method("rmu", {"retain": False}).needs()
    assert "reference" in build_method("npo").needs()
    # RMU's retain term is on by default but off in the paper's arithmetic/language configs
    assert "reference" in build_method("rmu").needs()
    assert "reference" not in build_method("rmu", task="arithmetic").needs()


def test_unknown_method_names_the_known_ones_and_a_close_match():
    with pytest.raises(UndoError, match=r"unknown method 'gradif'.*did you mean 'graddiff'.*known: grad_ascent"):
        method_class("gradif")


def test_unknown_option_is_rejected_with_valid_names():
    with pytest.raises(UndoError, match=r"unknown key 'retain_wieght'.*retain_weight"):
        build_method("graddiff", {"retain_wieght": 2})
    with pytest.raises(UndoError, match="must be >= 0"):
        build_method("graddiff", {"retain_weight": -1})


def test_attach_refuses_models_a_method_does_not_use():
    method = build_method("graddiff")
    with pytest.raises(UndoError, match="does not use a reference"):
        method.attach(reference=BigramLM(1))
    with pytest.raises(UndoError, match="needs a reference"):
        build_method("npo").attach()


def test_method_run_and_unlearn_config_validation():
    from undo.config import from_dict

    with pytest.raises(UndoError, match="unknown method"):
        from_dict(MethodRun, {"method": "nope"})
    with pytest.raises(UndoError, match="unknown key 'stepz'"):
        from_dict(MethodRun, {"method": "graddiff", "train": {"stepz": 3}})
    with pytest.raises(UndoError, match="two recipes are named graddiff"):
        from_dict(UnlearnConfig, {"methods": [{"method": "graddiff"}, {"method": "graddiff"}]})
    cfg = from_dict(UnlearnConfig, {"methods": [{"method": "rmu", "options": {"layers": [1], "layer": 1}}],
                                    "sweep": {"lr": ["1e-4", 3e-4], "steps": ["5"]}})  # YAML reads 1e-4 as text
    assert cfg.methods[0].options == {"layers": [1], "layer": 1}
    assert cfg.sweep == {"lr": [1e-4, 3e-4], "steps": [5]}


def test_sweep_runs_expand_train_settings_and_options():
    runs = sweep_runs(MethodRun("graddiff", train={"steps": 5}), {"lr": [1e-4, 3e-4], "retain_weight": [1.0]})
    assert [r.name for r in runs] == ["graddiff-lr=0.0001-retain_weight=1", "graddiff-lr=0.0003-retain_weight=1"]
    assert runs[1].train == {"steps": 5, "lr": 3e-4} and runs[1].options == {"retain_weight": 1.0}
    with pytest.raises(UndoError, match="sweep key 'alpha'"):
        sweep_runs(MethodRun("graddiff"), {"alpha": [1]})


def test_select_teacher_accuracy_and_cross_entropy():
    results = [{"name": "a", "forget": 0.10, "retain": 0.70},   # forgets most, retain too low
               {"name": "b", "forget": 0.30, "retain": 0.92},
               {"name": "c", "forget": 0.30, "retain": 0.95},   # ties b on forget, better retain
               {"name": "d", "forget": 0.60, "retain": 0.99}]
    assert select_teacher(results, 1.0, 0.1, higher_is_better=True) == "c"
    ce = [{"name": "a", "metrics": {"forget_ce": 5.0, "retain_ce": 3.0}},
          {"name": "b", "metrics": {"forget_ce": 4.0, "retain_ce": 2.1}},
          {"name": "c", "metrics": {"forget_ce": 3.0, "retain_ce": 2.0}}]
    assert select_teacher(ce, 2.0, 0.1, higher_is_better=False) == "b"
    with pytest.raises(UndoError, match="no unlearned model keeps its retain metric within 0.5%.*closest is d"):
        select_teacher(results, 1.0, 0.005, higher_is_better=True)


# ---------------------------------------------------------------- SAM

def test_sam_step_restores_weights_and_leaves_the_perturbed_gradient():
    sam = build_method("sam", {"base_method": "grad_ascent", "rho": 0.05})
    model = BigramLM(0)
    sam.prepare(model)
    batches = {"forget": FORGET}
    w = model.embed.weight.detach().clone()

    # by hand: g at w, then the gradient at w + rho * g / ||g||
    probe = BigramLM(0)
    sam.base.loss(probe, batches).loss.backward()
    g = probe.embed.weight.grad.clone()
    with torch.no_grad():
        probe.embed.weight.add_(0.05 * g / g.norm())
    probe.embed.weight.grad = None
    sam.base.loss(probe, batches).loss.backward()
    expected_grad = probe.embed.weight.grad

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = sam.step_hook()(model, optimizer, lambda: sam.loss(model, batches))
    assert torch.equal(model.embed.weight.detach(), w)
    assert torch.allclose(model.embed.weight.grad, expected_grad, atol=1e-6)
    assert out.loss.item() == pytest.approx(sam.base.loss(BigramLM(0), batches).loss.item())
    # both forward/backward passes are counted: 2 x 6 x params x tokens
    assert out.train_flops == 2 * 6.0 * V * V * FORGET["input_ids"].numel() and out.extra_flops == 0.0


def test_sam_takes_its_base_methods_needs_and_defaults():
    sam = build_method("sam", {"base_method": "npo"})
    assert sam.needs() == build_method("npo").needs()
    assert sam.row_format == "padded" and sam.train_defaults == build_method("npo").train_defaults
    with pytest.raises(UndoError, match="unknown method"):
        build_method("sam", {"base_method": "nope"})


# ---------------------------------------------------------------- RMU and RepNoise on a real decoder

def tiny_llama(seed=0, layers=4):
    config = AutoConfig.for_model("llama", vocab_size=12, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                  max_position_embeddings=32, tie_word_embeddings=True,
                                  initializer_range=0.3)  # large weights: every layer matters
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


LLAMA_BATCH = {"input_ids": torch.tensor([[1, 5, 7, 9, 3], [1, 4, 4, 0, 0]]),
               "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
               "labels": torch.tensor([[IGNORE, IGNORE, 7, 9, 3], [IGNORE, 4, 4, IGNORE, IGNORE]])}


def test_rmu_default_layers_scale_the_papers_choice():
    assert default_layers(14) == ([5, 6, 7, 8, 9, 10, 11], 11)
    assert default_layers(4) == ([1, 2], 2)


def test_rmu_loss_matches_full_forward_hidden_states_and_skips_later_layers():
    reference = tiny_llama(0)
    model = copy.deepcopy(reference)
    with torch.no_grad():  # make the retain term non-zero
        arch.mlp_down(model, 1).weight.normal_(0.0, 0.5)
    method = build_method("rmu", {"steering_coef": 2.0, "retain_weight": 5.0}, seed=3)
    method.attach(reference=reference)
    method.prepare(model)
    assert (method.layers, method.layer) == ([1, 2], 2)
    trained = {id(p) for p in method.trainable_parameters(model)}
    assert trained == {id(arch.mlp_down(model, 1).weight), id(arch.mlp_down(model, 2).weight)}

    calls = []
    handle = arch.decoder_layers(model)[3].register_forward_hook(lambda *a: calls.append(1))
    out = method.loss(model, {"forget": LLAMA_BATCH, "retain": LLAMA_BATCH})
    handle.remove()
    assert calls == []  # the forward pass stopped after layer L = 2

    with torch.no_grad():
        h = model(**{k: LLAMA_BATCH[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True).hidden_states[3]
        h_ref = reference(**{k: LLAMA_BATCH[k] for k in ("input_ids", "attention_mask")},
                          output_hidden_states=True).hidden_states[3]
    u = torch.randn(16, generator=torch.Generator().manual_seed(3))
    u = (u / u.norm()).tolist()
    mask = LLAMA_BATCH["attention_mask"].tolist()
    forget_terms, retain_terms = [], []
    for b in range(2):
        for t in range(5):
            if mask[b][t]:
                forget_terms.append(sum((h[b, t, i].item() - 2.0 * u[i]) ** 2 for i in range(16)) / 16)
                retain_terms.append(sum((h[b, t, i].item() - h_ref[b, t, i].item()) ** 2 for i in range(16)) / 16)
    forget_mse, retain_mse = sum(forget_terms) / 8, sum(retain_terms) / 8
    assert retain_mse > 1e-4
    assert out.logs["forget_mse"] == pytest.approx(forget_mse, rel=1e-4)
    assert out.logs["retain_mse"] == pytest.approx(retain_mse, rel=1e-4)
    assert out.loss.item() == pytest.approx(forget_mse + 5.0 * retain_mse, rel=1e-4)
    through_l = sum(p.numel() for p in arch.decoder_layers(reference)[:3].parameters())
    assert out.extra_flops == 2.0 * through_l * LLAMA_BATCH["input_ids"].numel()
    # The trained model: forward through L, activation gradients over layers 1..2 (the first
    # trained layer to L), weight gradients for the two down-projections; forget + retain tokens.
    span = sum(p.numel() for p in arch.decoder_layers(model)[1:3].parameters())
    down = sum(arch.mlp_down(model, i).weight.numel() for i in (1, 2))
    assert out.train_flops == (2.0 * through_l + 2.0 * span + 2.0 * down) * 2 * LLAMA_BATCH["input_ids"].numel()
    assert out.train_flops < 6.0 * non_embedding_params(model) * 2 * LLAMA_BATCH["input_ids"].numel()


def test_rmu_layer_out_of_range_and_layers_after_l_are_errors():
    model = tiny_llama(0)
    with pytest.raises(UndoError, match="layer 7 is out of range"):
        build_method("rmu", {"layer": 7, "retain": False}).prepare(model)
    with pytest.raises(UndoError, match="layer 9 is out of range"):
        build_method("rmu", {"layers": [9], "layer": 2, "retain": False}).prepare(model)
    with pytest.raises(UndoError, match="use layers <= layer"):
        build_method("rmu", {"layers": [3], "layer": 2, "retain": False}).prepare(model)


def test_repnoise_loss_matches_its_parts():
    model = tiny_llama(1)
    method = build_method("repnoise", {"alpha": 0.5, "beta": 2.0})
    method.prepare(model)
    retain_labels = torch.tensor([[IGNORE, 5, 7, 9, 3], [IGNORE, 4, 4, IGNORE, IGNORE]])
    batches = {"forget": LLAMA_BATCH, "retain": {**LLAMA_BATCH, "labels": retain_labels}}
    torch.manual_seed(11)
    out = method.loss(model, batches)

    # by hand: MLP outputs via hooks, per-layer logit lens, same noise draws
    mlp = []
    hooks = [arch.mlp_down(model, i).register_forward_hook(lambda m, a, o: mlp.append(o)) for i in range(4)]
    with torch.no_grad():
        res = model(input_ids=LLAMA_BATCH["input_ids"], attention_mask=LLAMA_BATCH["attention_mask"],
                    output_hidden_states=True)
        retain_logits = model(input_ids=LLAMA_BATCH["input_ids"], attention_mask=LLAMA_BATCH["attention_mask"]).logits
    for h in hooks:
        h.remove()
    keep = LLAMA_BATCH["attention_mask"].unsqueeze(-1).float()
    torch.manual_seed(11)
    mmd = sum(gaussian_mmd((a * keep).flatten(1), (torch.randn_like(a) * keep).flatten(1)).item() for a in mlp[:4]) / 4

    def ce(logits, labels):
        vals = []
        for b in range(2):
            for t in range(4):
                y = labels[b, t + 1].item()
                if y != IGNORE:
                    vals.append(-torch.log_softmax(logits[b, t], -1)[y].item())
        return sum(vals) / len(vals)

    with torch.no_grad():
        lens = [ce(model.lm_head(model.model.norm(res.hidden_states[i + 1])), LLAMA_BATCH["labels"]) for i in range(3)]
    layer_ces = lens + [ce(res.logits, LLAMA_BATCH["labels"])]
    forget_ce = sum(layer_ces) / 4
    expected = ce(retain_logits, batches["retain"]["labels"]) + 2.0 * mmd - 0.5 * math.log(forget_ce + 1)
    assert out.logs["mmd"] == pytest.approx(mmd, rel=1e-4)
    assert out.logs["forget_ce_layers"] == pytest.approx(forget_ce, rel=1e-4)
    assert out.loss.item() == pytest.approx(expected, rel=1e-4)


def test_task_vector_subtracts_the_finetuning_change_scaled():
    model = tiny_llama(2)
    method = build_method("task_vector", {"scale": 0.5})
    frozen = arch.decoder_layers(model)[0].self_attn.q_proj.weight
    frozen.requires_grad_(False)                     # not trained: never edited
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    method.start(model, {})
    out = method.loss(model, {"forget": LLAMA_BATCH})
    with torch.no_grad():                            # plain finetuning on forget: CE of the scored tokens
        logits = model(input_ids=LLAMA_BATCH["input_ids"], attention_mask=LLAMA_BATCH["attention_mask"]).logits
    terms = [-log_softmax(logits[r, t].tolist())[y] for r, t, y in scored(LLAMA_BATCH)]
    assert out.loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    deltas = {}
    with torch.no_grad():                            # stands in for the training run
        for n, p in model.named_parameters():
            deltas[n] = torch.randn_like(p) * 0.1
            p.add_(deltas[n])
        method.finish(model, {})
    for n, p in model.named_parameters():
        expected = theta[n] + deltas[n] if p is frozen else theta[n] - 0.5 * deltas[n]
        assert torch.allclose(p, expected, atol=1e-6), n


def test_joined_forward_on_a_real_decoder_gives_each_batch_its_own_logits(monkeypatch):
    """With right padding and a causal mask, a row's real positions have the logits they have alone."""
    import undo.methods.base as base

    monkeypatch.setitem(base.JOINT_FORWARD, "cpu", True)
    model = tiny_llama()
    narrow = {k: v[:, :4] for k, v in LLAMA_BATCH.items()}
    with torch.no_grad():
        joined = base.logits_of_each(model, [LLAMA_BATCH, narrow])
        alone = [base.logits_of(model, LLAMA_BATCH), base.logits_of(model, narrow)]
    for j, a, b in zip(joined, alone, (LLAMA_BATCH, narrow)):
        real = b["attention_mask"].bool()
        assert j.shape == a.shape and torch.allclose(j[real], a[real], atol=1e-5)
