import torch
import pytest

from undo.data import IGNORE, BatchStream, pack, pad_batch, tokenize_example, tokenize_examples
from undo.errors import UndoError
from undo.tasks.base import Example
from undo.tokenization import train_tokenizer

CORPUS = ["12 + 7 = 19", "What is 3 times 4? Answer: 12", "Tom has 5 apples.", "안녕하세요 세계"]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_tokenizer_round_trip(kind, tmp_path):
    tok = train_tokenizer(CORPUS, kind, vocab_size=300)
    for text in CORPUS:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # digits are single tokens, so numbers tokenize the same everywhere
    ids = tok("1234", add_special_tokens=False)["input_ids"]
    assert len(ids) == 4
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("12 + 7 = 19")["input_ids"] == tok("12 + 7 = 19")["input_ids"]
    assert again.pad_token_id == tok.pad_token_id and again.eos_token_id == tok.eos_token_id


def test_bpe_encodes_unseen_text():
    tok = train_tokenizer(CORPUS, "bpe", vocab_size=300)
    text = "zebra Ωmega 999"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_empty_corpus_is_an_error():
    with pytest.raises(UndoError):
        train_tokenizer([], "bpe")


def test_a_vocabulary_too_small_for_the_text_is_an_error():
    with pytest.raises(UndoError, match=r"tokenizer.vocab_size 100 is below the 260 tokens a byte-level BPE needs"):
        train_tokenizer(CORPUS, "bpe", vocab_size=100)
    chars = len(set("".join(CORPUS)))
    with pytest.raises(UndoError, match=rf"vocab_size 10 is below the {chars + 4} tokens a character tokenizer "
                                        rf"needs for this text \({chars} characters \+ 4 special tokens\)"):
        train_tokenizer(CORPUS, "char", vocab_size=10)
    assert len(train_tokenizer(CORPUS, "char", vocab_size=chars + 4)) == chars + 4
    assert len(train_tokenizer(CORPUS, "bpe", vocab_size=260)) == 260


def test_loss_mask_completion_vs_all():
    tok = train_tokenizer(CORPUS, "char")
    ex = Example("3 + 4 =", " 7")
    ids, mask = tokenize_example(tok, ex, "completion")
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    # scored: " ", "7", <eos>; nothing of BOS or the prompt
    assert sum(mask) == 3 and mask[-3:] == [True, True, True] and not any(mask[:-3])
    ids_all, mask_all = tokenize_example(tok, ex, "all")
    assert ids_all == ids and mask_all == [False] + [True] * (len(ids) - 1)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_batched_tokenization_equals_one_example_at_a_time(kind):
    tok = train_tokenizer(CORPUS, kind, vocab_size=300)
    examples = [Example("3 + 4 =", " 7"), Example("", "Tom has 5 apples."), Example("안녕", " 세계"),
                Example("What is 3 times 4? Answer:", "")]
    for loss_on in ("completion", "all"):
        assert tokenize_examples(tok, examples, loss_on) == [tokenize_example(tok, ex, loss_on) for ex in examples]


def test_pack_never_splits_examples_and_pads_with_ignore():
    seqs = [([1, 5, 6, 2], [False, True, True, True]), ([1, 7, 2], [False, True, True]), ([1, 8, 9, 9, 2], [False] * 5)]
    rows = pack(seqs, seq_len=8, pad_id=0)
    assert rows["input_ids"].tolist() == [[1, 5, 6, 2, 1, 7, 2, 0], [1, 8, 9, 9, 2, 0, 0, 0]]
    assert rows["attention_mask"].tolist() == [[1] * 7 + [0], [1] * 5 + [0] * 3]
    assert rows["labels"].tolist() == [[IGNORE, 5, 6, 2, IGNORE, 7, 2, IGNORE], [IGNORE] * 8]


def test_padding_does_not_change_the_loss():
    """The same example's loss is identical alone and next to a longer example (right padding)."""
    from undo.metrics import masked_ce
    from undo.models import ModelConfig, build_model

    tok = train_tokenizer(CORPUS, "char")
    model = build_model(ModelConfig(preset="tiny"), tok, seed=0).eval()
    short, long = Example("3 + 4 =", " 7"), Example("What is 3 times 4? Answer:", " 12")
    alone = pad_batch(tok, [short], "completion")
    both = pad_batch(tok, [short, long], "completion")
    assert both["input_ids"].shape[1] > alone["input_ids"].shape[1]
    with torch.no_grad():
        l1 = masked_ce(model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).logits, alone["labels"])
        out = model(input_ids=both["input_ids"], attention_mask=both["attention_mask"]).logits
        l2 = masked_ce(out[:1], both["labels"][:1])
    assert torch.allclose(l1, l2, atol=1e-5)


def test_batch_stream_deterministic_and_covers_every_row():
    n = 50
    rows = {"input_ids": torch.arange(n)[:, None].repeat(1, 4), "attention_mask": torch.ones(n, 4, dtype=torch.long),
            "labels": torch.zeros(n, 4, dtype=torch.long)}
    a, b = BatchStream(rows, 10, seed=1), BatchStream(rows, 10, seed=1)
    seen = torch.cat([a.batch(k)["input_ids"][:, 0] for k in range(5)])
    assert sorted(seen.tolist()) == list(range(n))  # one epoch = every row once
    assert torch.equal(a.batch(7)["input_ids"], b.batch(7)["input_ids"])  # any step, no history needed
    assert not torch.equal(BatchStream(rows, 10, seed=2).batch(0)["input_ids"], a.batch(0)["input_ids"])


def test_bucketing_reduces_padding():
    g = torch.Generator().manual_seed(0)
    n, width = 640, 40
    lengths = torch.randint(5, width, (n,), generator=g)
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    rows = {"input_ids": mask.clone(), "attention_mask": mask, "labels": mask.clone()}
    plain, bucketed = BatchStream(rows, 16, seed=0), BatchStream(rows, 16, seed=0, bucket=True)
    cells = lambda s: sum(s.batch(k)["input_ids"].numel() for k in range(n // 16))  # noqa: E731
    assert cells(bucketed) < 0.7 * cells(plain)
    seen = torch.cat([bucketed.batch(k)["attention_mask"].sum(1) for k in range(n // 16)])
    assert sorted(seen.tolist()) == sorted(lengths.tolist())  # still every row once per epoch
