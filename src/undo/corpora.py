"""Text corpora: stream documents from files, and check that a tokenizer and a model can take them.

Readers accept, per path:
- `.txt` (optionally `.gz`): one document per non-empty line, or the whole file as one document;
- `.jsonl` (optionally `.gz`): one JSON object per line, the document in a field (`text` by default);
- `.parquet`: a string column (needs `pyarrow`, `pip install 'undo[data]'`);
- a directory written by `datasets.Dataset.save_to_disk` (needs `datasets`; a saved
  `DatasetDict` needs a split name).
Everything is streamed: a huge corpus (FineWeb-Edu, FineWeb-2) is read only up to
`max_documents` documents / `max_chars` characters. Character budgets, not token budgets:
the tokenizer is usually trained on this very text, so tokens are not known yet.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Optional

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .errors import UndoError

TxtMode = Literal["line", "file"]
READABLE = ".txt, .txt.gz, .jsonl, .jsonl.gz, .parquet, or a datasets directory (save_to_disk)"


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _kind(path: Path) -> str:
    if path.is_dir():
        return "datasets"
    name = path.name.lower()
    for suffix, kind in ((".txt", "txt"), (".txt.gz", "txt"), (".jsonl", "jsonl"), (".jsonl.gz", "jsonl"),
                         (".parquet", "parquet")):
        if name.endswith(suffix):
            return kind
    raise UndoError(f"{path}: unknown corpus file type; give {READABLE}")


def _txt_documents(path: Path, mode: TxtMode) -> Iterator[str]:
    try:
        with _open_text(path) as f:
            if mode == "file":
                text = f.read().strip()
                if text:
                    yield text
                return
            for line in f:
                line = line.strip()
                if line:
                    yield line
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, OSError) as e:
        raise UndoError(f"{path}: cannot read it as UTF-8 text ({type(e).__name__}); give a UTF-8 text file") from None


def jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(`path:line`, object) for each non-blank line of a JSON-lines file (.gz too); bad JSON or
    bytes end in one line naming the file and line."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise UndoError(f"{path}:{lineno}: malformed JSON ({e.msg}); each line must be one JSON object") from None
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise UndoError(f"{path}: cannot read it as UTF-8 JSON lines ({type(e).__name__}); give a UTF-8 .jsonl file") from None


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    lineno = 0
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UndoError(f"{path}:{lineno}: malformed JSON ({e.msg}); each line must be one JSON object") from None
                if not isinstance(record, dict):
                    raise UndoError(f"{path}:{lineno}: expected a JSON object with a '{field}' field, got {type(record).__name__}")
                if field not in record:
                    keys = ", ".join(sorted(map(str, record))) or "none"
                    raise UndoError(f"{path}:{lineno}: no field '{field}' (fields: {keys}); set the text field option")
                text = record[field]
                if not isinstance(text, str):
                    raise UndoError(f"{path}:{lineno}: field '{field}' is {type(text).__name__}, not a string; "
                                    f"point the text field option at a string field")
                text = text.strip()
                if text:
                    yield text
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, OSError) as e:
        raise UndoError(f"{path}:{lineno + 1}: cannot read it as UTF-8 text ({type(e).__name__}); give a UTF-8 JSONL file") from None


def _parquet_documents(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise UndoError(f"{path}: reading .parquet needs pyarrow; pip install 'undo[data]'") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-parquet bytes
        raise UndoError(f"{path}: not a readable parquet file ({type(e).__name__}); check the file") from None
    columns = parquet.schema_arrow.names
    if field not in columns:
        raise UndoError(f"{path}: no column '{field}' (columns: {', '.join(columns)}); set the text field option")
    for batch in parquet.iter_batches(batch_size=1024, columns=[field]):
        for text in batch.column(0).to_pylist():
            if text is None:
                continue
            if not isinstance(text, str):
                raise UndoError(f"{path}: column '{field}' holds {type(text).__name__}, not strings; choose a text column")
            text = text.strip()
            if text:
                yield text


def load_saved_dataset(path: Path, split: Optional[str], how_to_split: str, readable: str):
    """A `datasets` Dataset saved with save_to_disk; a DatasetDict needs `split` unless it has one split."""
    try:
        import datasets
    except ModuleNotFoundError:
        raise UndoError(f"{path}: reading a saved dataset needs the `datasets` package; pip install 'undo[data]'") from None
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as e:  # FileNotFoundError for a plain directory, others for damaged ones
        raise UndoError(f"{path}: not a dataset saved with save_to_disk ({type(e).__name__}); give {readable}") from None
    if isinstance(data, datasets.DatasetDict):
        splits = list(data)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in data:
            raise UndoError(f"{path}: a DatasetDict with splits {', '.join(splits)}; {how_to_split}")
        data = data[split]
    return data


def _datasets_documents(path: Path, field: str, split: Optional[str]) -> Iterator[str]:
    data = load_saved_dataset(path, split, "choose one with the split option", READABLE)
    if field not in data.column_names:
        raise UndoError(f"{path}: no column '{field}' (columns: {', '.join(data.column_names)}); set the text field option")
    for start in range(0, len(data), 1024):  # slices are read from the memory-mapped Arrow files
        for text in data[start:start + 1024][field]:
            if isinstance(text, str) and text.strip():
                yield text.strip()


def iter_documents(path: str | Path, text_field: str = "text", txt_mode: TxtMode = "line",
                   split: Optional[str] = None) -> Iterator[str]:
    """Documents of one corpus path, lazily, stripped, empty ones skipped."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UndoError(f"corpus file {path} does not exist; check the path")
    kind = _kind(path)
    if kind == "txt":
        return _txt_documents(path, txt_mode)
    if kind == "jsonl":
        return _jsonl_documents(path, text_field)
    if kind == "parquet":
        return _parquet_documents(path, text_field)
    return _datasets_documents(path, text_field, split)


def read_corpus(paths: Sequence[str | Path], max_documents: int, max_chars: Optional[int] = None,
                text_field: str = "text", txt_mode: TxtMode = "line", split: Optional[str] = None) -> list[str]:
    """Up to `max_documents` documents (and `max_chars` characters) from `paths`, in order.

    Every path must give at least one document: an empty file is almost always a mistake."""
    if not paths:
        raise UndoError("no corpus files given; list at least one file")
    docs: list[str] = []
    chars = 0
    for path in paths:
        if len(docs) >= max_documents or (max_chars is not None and chars >= max_chars):
            break
        found = 0
        for text in iter_documents(path, text_field, txt_mode, split):
            found += 1
            docs.append(text)
            chars += len(text)
            if len(docs) >= max_documents or (max_chars is not None and chars >= max_chars):
                break
        if found == 0:
            raise UndoError(f"{path}: no documents in it (empty, or only blank text); give a file with text")
    return docs


def check_encodes(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], where: str = "text") -> None:
    """UndoError if `tokenizer` turns any character of `texts` into its unknown token
    (a char tokenizer meeting unseen characters); byte-level BPE always passes."""
    unk = tokenizer.unk_token_id
    if unk is None or not texts:
        return
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    for text, ids in zip(texts, encoded):
        if unk in ids:
            bad = next((c for c in dict.fromkeys(text) if unk in tokenizer(c, add_special_tokens=False)["input_ids"]), "?")
            raise UndoError(f"{where}: the tokenizer cannot encode {bad!r} (it becomes {tokenizer.unk_token}); "
                            f"use a byte-level tokenizer (tokenizer.kind: bpe) or one trained on this text")


def check_seq_len(model: PreTrainedModel, seq_len: int, where: str = "seq_len") -> None:
    """UndoError if rows of `seq_len` tokens do not fit the model's position embeddings."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise UndoError(f"{where} = {seq_len} is longer than the model's max_position_embeddings ({limit}); "
                        f"lower {where} or build the model with model.max_position_embeddings >= {seq_len}")
