"""Corpus readers (txt, jsonl, parquet, saved datasets) and the tokenizer/model fit checks."""

from __future__ import annotations

import gzip
import json

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from undo.corpora import check_encodes, check_seq_len, iter_documents, read_corpus
from undo.errors import UndoError
from undo.tokenization import train_tokenizer


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_txt_one_document_per_line_skips_blank_lines(tmp_path):
    path = tmp_path / "en.txt"
    path.write_text("first doc\n\n  second doc  \n\nthird\n", encoding="utf-8")
    assert read_corpus([path], max_documents=10) == ["first doc", "second doc", "third"]


def test_txt_whole_file_mode_and_gzip(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("line one\nline two\n", encoding="utf-8")
    b = tmp_path / "b.txt.gz"
    with gzip.open(b, "wt", encoding="utf-8") as f:
        f.write("한국어 문서\n둘째 줄\n")
    assert read_corpus([a, b], max_documents=10, txt_mode="file") == ["line one\nline two", "한국어 문서\n둘째 줄"]
    assert read_corpus([b], max_documents=10) == ["한국어 문서", "둘째 줄"]


def test_jsonl_reads_the_named_field(tmp_path):
    path = write_jsonl(tmp_path / "ko.jsonl", [{"text": "안녕", "id": 1}, {"text": "세계", "id": 2}])
    assert read_corpus([path], max_documents=10) == ["안녕", "세계"]
    other = write_jsonl(tmp_path / "other.jsonl", [{"content": "x y"}])
    assert read_corpus([other], max_documents=10, text_field="content") == ["x y"]


def test_limits_stop_reading_early(tmp_path):
    # Line 3 is malformed: a streaming reader that stops at the limit never reaches it.
    path = tmp_path / "big.jsonl"
    path.write_text('{"text": "aaaa"}\n{"text": "bbbb"}\n{not json\n', encoding="utf-8")
    assert read_corpus([path], max_documents=2) == ["aaaa", "bbbb"]
    assert read_corpus([path], max_documents=100, max_chars=3) == ["aaaa"]
    with pytest.raises(UndoError, match=r"big\.jsonl:3: malformed JSON"):
        read_corpus([path], max_documents=100)


def test_limits_span_several_files(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("1\n2\n", encoding="utf-8")
    b = tmp_path / "b.txt"
    b.write_text("3\n4\n", encoding="utf-8")
    assert read_corpus([a, b], max_documents=3) == ["1", "2", "3"]


def test_jsonl_bad_field_names_file_line_and_fields(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "ok"}, {"body": "no text here", "id": 3}])
    with pytest.raises(UndoError, match=r"docs\.jsonl:2: no field 'text' \(fields: body, id\)"):
        read_corpus([path], max_documents=10)
    numbers = write_jsonl(tmp_path / "num.jsonl", [{"text": 5}])
    with pytest.raises(UndoError, match=r"num\.jsonl:1: field 'text' is int, not a string"):
        read_corpus([numbers], max_documents=10)
    listing = write_jsonl(tmp_path / "list.jsonl", [["text"]])
    with pytest.raises(UndoError, match=r"list\.jsonl:1: expected a JSON object"):
        read_corpus([listing], max_documents=10)


def test_empty_missing_unknown_and_binary_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(UndoError, match=r"empty\.txt: no documents"):
        read_corpus([empty], max_documents=10)
    with pytest.raises(UndoError, match=r"nothere\.txt does not exist"):
        read_corpus([tmp_path / "nothere.txt"], max_documents=10)
    odd = tmp_path / "data.csv"
    odd.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(UndoError, match=r"data\.csv: unknown corpus file type"):
        read_corpus([odd], max_documents=10)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x80abc")
    with pytest.raises(UndoError, match=r"bin\.txt: cannot read it as UTF-8"):
        read_corpus([binary], max_documents=10)
    with pytest.raises(UndoError, match="no corpus files"):
        read_corpus([], max_documents=10)


def test_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="parquet support is optional: pip install 'undo[data]'")
    import pyarrow.parquet as pq

    path = tmp_path / "fw.parquet"
    pq.write_table(pa.table({"text": ["doc one", None, "  ", "doc two"], "score": [1, 2, 3, 4]}), path)
    assert read_corpus([path], max_documents=10) == ["doc one", "doc two"]
    with pytest.raises(UndoError, match=r"fw\.parquet: no column 'content' \(columns: text, score\)"):
        read_corpus([path], max_documents=10, text_field="content")
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet", encoding="utf-8")
    with pytest.raises(UndoError, match=r"fake\.parquet: not a readable parquet file"):
        read_corpus([fake], max_documents=10)


def test_saved_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets", reason="saved-dataset support is optional: pip install 'undo[data]'")
    data = datasets.Dataset.from_dict({"text": ["가나다", "라마바", "사아자"]})
    data.save_to_disk(str(tmp_path / "ds"))
    assert read_corpus([tmp_path / "ds"], max_documents=2) == ["가나다", "라마바"]
    datasets.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UndoError, match=r"dd: a DatasetDict with splits train, test; choose one with the split option"):
        read_corpus([tmp_path / "dd"], max_documents=10)
    assert read_corpus([tmp_path / "dd"], max_documents=10, split="train") == ["가나다", "라마바", "사아자"]
    datasets.DatasetDict({"train": data}).save_to_disk(str(tmp_path / "one"))
    assert read_corpus([tmp_path / "one"], max_documents=10) == ["가나다", "라마바", "사아자"]  # the only split
    (tmp_path / "plain").mkdir()
    with pytest.raises(UndoError, match=r"plain: not a dataset saved with save_to_disk"):
        list(iter_documents(tmp_path / "plain"))


def test_check_encodes_catches_unknown_characters():
    char_tok = train_tokenizer(["abc 가나"], kind="char")
    check_encodes(char_tok, ["abc", "가나 a"])  # all seen: fine
    with pytest.raises(UndoError, match=r"forget text: the tokenizer cannot encode '다'.*tokenizer.kind: bpe"):
        check_encodes(char_tok, ["abc", "가나다"], where="forget text")
    bpe = train_tokenizer(["abc 가나"], kind="bpe", vocab_size=300)
    check_encodes(bpe, ["전혀 다른 글자 xyz Ω"])  # byte level: every character encodes


def test_check_seq_len_against_position_embeddings():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=16))
    check_seq_len(model, 16)
    with pytest.raises(UndoError, match=r"pretrain.seq_len = 32 is longer than the model's max_position_embeddings \(16\)"):
        check_seq_len(model, 32, "pretrain.seq_len")
