"""Real HF checkpoints from a directory: Llama, Gemma-2, Qwen2 and GPT-2 (tiny, random,
saved with save_pretrained), what undo.arch finds in them, and that they train."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, BertConfig, BertForMaskedLM, Gemma2Config, GPT2Config, LlamaConfig,
                          PreTrainedTokenizerFast, Qwen2Config)

from undo import arch
from undo.data import BatchStream, pack_examples
from undo.errors import UndoError
from undo.models import load_model
from undo.tasks.base import Example
from undo.tokenization import train_tokenizer
from undo.training import TrainConfig, lm_loss, train

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a small model learns to repeat a few short sentences",
    "numbers like 12 and 345 are split into digits",
    "every checkpoint loads from a local directory",
] * 4



def arch_configs(vocab: int) -> dict[str, object]:
    common = dict(vocab_size=vocab, max_position_embeddings=64)
    return {
        "llama": LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, **common),
        "gemma2": Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, **common),
        "qwen2": Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, **common),
        "gpt2": GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=vocab, n_positions=64),
    }


def gpt2_style_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE whose only special token is <|endoftext|> (bos = eos = unk), no pad: like GPT-2's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> directory of a saved tiny random model + tokenizer (GPT-2 gets the pad-less tokenizer)."""
    root = tmp_path_factory.mktemp("ckpts")
    undo_tok = train_tokenizer(SENTENCES, "bpe", vocab_size=300)
    gpt_tok = gpt2_style_tokenizer()
    out = {}
    for name in ("llama", "gemma2", "qwen2", "gpt2"):
        tok = gpt_tok if name == "gpt2" else undo_tok
        config = arch_configs(len(tok))[name]
        config.pad_token_id, config.bos_token_id, config.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


ARCHS = ["llama", "gemma2", "qwen2", "gpt2"]


@pytest.mark.parametrize("name", ARCHS)
def test_load_model_reads_each_architecture_exactly(checkpoints, name):
    model, tok = load_model(checkpoints[name])
    assert model.config.model_type == name
    reference = AutoModelForCausalLM.from_pretrained(checkpoints[name])
    ids = torch.tensor([tok("the quick brown fox", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert tok.pad_token_id is not None


def test_gpt2_style_tokenizer_gets_eos_as_pad(checkpoints):
    _, tok = load_model(checkpoints["gpt2"])
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id


@pytest.mark.parametrize("name", ARCHS)
def test_decoder_layers_and_mlp_down_projection(checkpoints, name):
    model, _ = load_model(checkpoints[name])
    layers = arch.decoder_layers(model)
    assert arch.num_layers(model) == 3 and len(layers) == 3
    for i in range(3):
        down = arch.mlp_down(model, i)
        if name == "gpt2":
            # Conv1D stores its weight as [in, out]: MLP width 4 x 32 in, hidden 32 out.
            assert type(down).__name__ == "Conv1D" and down is model.transformer.h[i].mlp.c_proj
            assert tuple(down.weight.shape) == (128, 32)
        else:
            assert isinstance(down, torch.nn.Linear) and down is model.model.layers[i].mlp.down_proj
            assert tuple(down.weight.shape) == (32, 64)
    with pytest.raises(UndoError, match="layer 3 is out of range; this model has layers 0..2"):
        arch.mlp_down(model, 3)
    with pytest.raises(UndoError, match="out of range"):
        arch.check_layer(model, -1, "rmu.layers")


@pytest.mark.parametrize("name,offset", [("llama", 0.0), ("gemma2", 1.0), ("qwen2", 0.0)])
def test_norm_offset_matches_the_norms_arithmetic(checkpoints, name, offset):
    """With every norm weight w set to 0 the scale is offset + 0: Gemma's (1 + w) RMSNorm
    still passes x / rms(x) through, Llama's and Qwen's w * x / rms(x) gives 0."""
    model, _ = load_model(checkpoints[name])
    assert arch.norm_offset(model) == offset
    norm = arch.decoder_layers(model)[0].input_layernorm
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        norm.weight.zero_()
        rms = x.pow(2).mean(-1, keepdim=True).add(norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps).sqrt()
        assert torch.allclose(norm(x), offset * x / rms, atol=1e-5)


@pytest.mark.parametrize("name,tied", [("llama", False), ("gemma2", True), ("qwen2", False), ("gpt2", True)])
def test_tied_embeddings_are_detected_after_loading(checkpoints, name, tied):
    model, _ = load_model(checkpoints[name])
    assert arch.embeddings_tied(model) is tied
    groups = arch.tied_parameters(model)
    if tied:
        emb = "model.embed_tokens.weight" if name == "gemma2" else "transformer.wte.weight"
        assert groups == [[emb, "lm_head.weight"]]
    else:
        assert groups == []


@pytest.mark.parametrize("name", ARCHS)
def test_residual_stream_is_the_output_of_the_layer(checkpoints, name):
    model, tok = load_model(checkpoints[name])
    ids = torch.tensor([tok("a small model learns", add_special_tokens=False)["input_ids"]] * 2)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for layer in (0, 1):
            assert torch.allclose(arch.residual_stream(model, layer, ids, mask), hidden[layer + 1], atol=1e-6)
        # The last entry of hidden_states is after the final norm; the hook reads the layer itself.
        full = arch.residual_stream(model, 2, ids, mask, stop_early=False)
        assert torch.equal(arch.residual_stream(model, 2, ids, mask), full)
        assert not torch.allclose(full, hidden[3])
        # A cut-short pass leaves the model as it was: the next full forward is unchanged.
        assert torch.equal(model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1], hidden[1])


def test_truncated_residual_stream_backpropagates_only_to_earlier_layers(checkpoints):
    model, tok = load_model(checkpoints["llama"])
    ids = torch.tensor([tok("every checkpoint loads", add_special_tokens=False)["input_ids"]])
    arch.residual_stream(model, 1, ids).pow(2).mean().backward()
    assert arch.mlp_down(model, 0).weight.grad.abs().sum() > 0
    assert arch.mlp_down(model, 1).weight.grad.abs().sum() > 0
    assert arch.mlp_down(model, 2).weight.grad is None  # never ran
    assert model.lm_head.weight.grad is None
    with pytest.raises(UndoError, match="layer 7 is out of range"):
        arch.residual_stream(model, 7, ids)


def test_unwrap_sees_through_torch_compile(checkpoints):
    model, _ = load_model(checkpoints["llama"])
    compiled = torch.compile(model)  # compiles lazily: no work until called
    assert arch.unwrap(compiled) is model
    assert arch.decoder_layers(compiled) is model.model.layers


def test_unknown_architecture_names_the_fix():
    class Fake(torch.nn.Module):
        config = type("C", (), {"model_type": "bloom"})()

    with pytest.raises(UndoError, match="architecture 'bloom' is not in undo's table .*add an ArchSpec line"):
        arch.decoder_layers(Fake())


def small_stream(tok, seed: int = 0) -> BatchStream:
    rows = pack_examples(tok, [Example("", s) for s in SENTENCES], seq_len=32, loss_on="all")
    return BatchStream(rows, batch_size=4, seed=seed)


@pytest.mark.parametrize("name", ARCHS)
def test_a_few_training_steps_lower_the_loss(checkpoints, name):
    model, tok = load_model(checkpoints[name])
    stream = small_stream(tok)
    batch = {k: v for k, v in stream.batch(0).items()}
    with torch.no_grad():
        before = lm_loss(model, {"train": batch}).loss.item()
    cfg = TrainConfig(steps=8, batch_size=4, seq_len=32, lr=1e-2, schedule="constant", checkpoint_every=0)
    train(model, lm_loss, {"train": stream}, cfg, seed=0)
    with torch.no_grad():
        after = lm_loss(model, {"train": batch}).loss.item()
    assert after < before - 0.5, (before, after)


def test_gradient_checkpointing_gives_the_same_weights(checkpoints):
    """Recomputing activations in the backward pass changes memory, not arithmetic."""
    def checkpointing_on(model):
        return any(getattr(m, "gradient_checkpointing", False) for m in arch.unwrap(model).modules())

    results = []
    for checkpointing in (False, True):
        model, tok = load_model(checkpoints["llama"])
        seen = []

        def loss_fn(m, batches):
            seen.append(checkpointing_on(m))
            return lm_loss(m, batches)

        cfg = TrainConfig(steps=3, batch_size=4, seq_len=32, lr=1e-2, checkpoint_every=0,
                          gradient_checkpointing=checkpointing)
        train(model, loss_fn, {"train": small_stream(tok)}, cfg, seed=0)
        assert seen == [checkpointing] * 3
        assert not checkpointing_on(model)  # a setting of the run, switched off afterwards
        results.append(model.state_dict())
    for key in results[0]:
        assert torch.allclose(results[0][key], results[1][key], atol=1e-6), key


# ---- directories that are not causal LMs ------------------------------------------------

def test_encoder_checkpoint_is_refused_in_one_line(tmp_path):
    BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(tmp_path / "bert")
    with pytest.raises(UndoError) as e:
        load_model(tmp_path / "bert")
    msg = str(e.value)
    assert "'bert' is a bidirectional encoder" in msg and "ForCausalLM" in msg and "\n" not in msg


@pytest.mark.parametrize("setup,expected", [
    (lambda d: None, "has no config.json"),
    (lambda d: (d / "config.json").write_text("{oops"), "config.json is not valid JSON"),
    (lambda d: (d / "config.json").write_text("{}"), "has no model_type"),
    (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "frobnicator"})), "unknown to this transformers"),
    (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "t5"})), "'t5' is not a causal language model"),
    (lambda d: LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                           num_attention_heads=1).save_pretrained(d), "has a config but no weights"),
])
def test_not_a_causal_lm_directory(tmp_path, setup, expected):
    setup(tmp_path)
    with pytest.raises(UndoError) as e:
        load_model(tmp_path)
    assert expected in str(e.value) and "\n" not in str(e.value) and ";" in str(e.value)


def test_a_file_is_not_a_model_directory(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(UndoError, match="is not a directory"):
        load_model(tmp_path / "weights.bin")
