"""Artifacts: a stage's output directory, written atomically and cached by a key.

    <run_dir>/<stage>/model/       HF checkpoint (save_pretrained, safetensors) + tokenizer
    <run_dir>/<stage>/result.json  sidecar: stage, key, config, metrics, FLOPs, seed, timing, versions

A stage is built in `<stage>.partial/` and renamed into place only when complete, so a
killed run never leaves a half-written artifact; the resume point of an interrupted
stage lives in `<stage>.resume/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import __version__, distributed
from .errors import UndoError, write_errors


def versions() -> dict[str, str]:
    import accelerate
    import transformers

    return {"undo": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__}


class Artifact:
    def __init__(self, run_dir: Path, stage: str):
        self.dir = Path(run_dir) / stage
        self.stage = stage

    @property
    def model_dir(self) -> Path:
        """The checkpoint: `<stage>/model`, or the one a sidecar points to (a starting model
        given by path; a selection, which points to its winner)."""
        result = self.result() if (self.dir / "result.json").exists() else None
        if result and result.get("model_path"):
            return Path(result["model_path"])
        return self.dir / "model"

    @property
    def partial_dir(self) -> Path:
        return self.dir.with_name(self.dir.name + ".partial")

    @property
    def resume_dir(self) -> Path:
        return self.dir.with_name(self.dir.name + ".resume")

    def result(self) -> Optional[dict[str, Any]]:
        path = self.dir / "result.json"
        if not path.exists():
            return None
        try:
            result = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            result = None
        if not isinstance(result, dict):
            raise UndoError(f"{path} is corrupt (not a JSON object); delete {self.dir} and rerun to recompute the stage")
        return result

    def is_done(self, key: str) -> bool:
        result = self.result()
        return result is not None and result.get("key") == key

    def check_replaceable(self, kind: Optional[str] = None) -> None:
        """UndoError unless a stage may be written here: `<stage>/` is absent or empty, or it is
        an artifact undo wrote (a rerun with other settings replaces it), and, when `kind` is
        given, one of a stage of that kind. Anything else is never replaced: undo deletes only
        what it wrote."""
        where = "choose another run directory (--run-dir / --out) or name, or move it away"
        if self.dir.exists() and not self.dir.is_dir():
            raise UndoError(f"{self.dir} exists and is a file, not a stage directory; {where}")
        if not self.dir.exists() or not any(self.dir.iterdir()):
            return
        result = self.result()  # a corrupt result.json raises here, naming the fix
        if result is None or "key" not in result:
            raise UndoError(f"{self.dir} exists and holds files undo did not write (no result.json of a stage); "
                            f"nothing was replaced; {where}")
        if kind is not None and result.get("kind", kind) != kind:
            raise UndoError(f"{self.dir} holds the artifact of another kind of stage ({result['kind']}, not {kind}); "
                            f"nothing was replaced; {where}")

    def write(self, key: str, sidecar: dict[str, Any], model: Optional[PreTrainedModel] = None,
              tokenizer: Optional[PreTrainedTokenizerBase] = None, extra_files: Optional[dict[str, str]] = None,
              state_dict: Optional[dict[str, torch.Tensor]] = None, force: bool = False) -> None:
        """Write the whole artifact to `<stage>.partial` and move it into place in one rename.

        Every process of a multi-process run calls this; the main one writes (with
        `state_dict`, the gathered weights of a sharded model, when given) and the
        others wait until the artifact is in place. A directory in the way that undo did
        not write is refused (`check_replaceable`) unless `force`."""
        if distributed.is_main_process():
            if not force:
                self.check_replaceable()
            self._write(key, sidecar, model, tokenizer, extra_files, state_dict)
        distributed.barrier()

    def _write(self, key, sidecar, model, tokenizer, extra_files, state_dict) -> None:
        """A failed write (disk full, read-only directory) leaves no `.partial` behind and the
        previous artifact, if any, in place; it ends as one UndoError naming the path."""
        tmp = self.partial_dir
        old = self.dir.with_name(self.dir.name + ".old")
        with write_errors(self.dir, cleanup=tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            if model is not None:
                model.save_pretrained(str(tmp / "model"), safe_serialization=True, state_dict=state_dict)
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(tmp / "model"))
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
            body = {"stage": self.stage, "key": key, **sidecar, "versions": versions(), "argv": sys.argv}
            (tmp / "result.json").write_text(json.dumps(body, indent=2, default=str))
            shutil.rmtree(old, ignore_errors=True)
            if self.dir.exists():
                os.replace(self.dir, old)
            try:
                os.replace(tmp, self.dir)
            except OSError:
                if old.exists() and not self.dir.exists():
                    os.replace(old, self.dir)  # the previous artifact goes back where it was
                raise
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.resume_dir, ignore_errors=True)


class ModelDir:
    """A model given as a plain checkpoint directory (no sidecar), usable where an Artifact is."""

    def __init__(self, path: str | Path):
        self.model_dir = Path(path)

    def result(self) -> Optional[dict[str, Any]]:
        return None


def model_source(path: str | Path) -> Artifact | ModelDir:
    """An artifact directory (`<stage>/` or `<stage>/model`) as its Artifact, else a plain directory."""
    path = Path(path).expanduser()
    if (path / "model" / "config.json").exists() or ((path / "result.json").exists() and not (path / "config.json").exists()):
        return Artifact(path.parent, path.name)  # a selection or a checkpoint stage points to its model
    if path.name == "model" and (path.parent / "result.json").exists():
        return Artifact(path.parent.parent, path.parent.name)
    return ModelDir(path)


def source_key(source: Artifact | ModelDir) -> str:
    """What identifies an input model in a cache key: its stage key, else the files' names, sizes, mtimes."""
    result = source.result()
    if result and "key" in result:
        return result["key"]
    model_dir = Path(source.model_dir)
    if not model_dir.exists():
        raise UndoError(f"model path {model_dir} does not exist; give a checkpoint directory (e.g. runs/<name>/seed0/base/model)")
    stats = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in model_dir.iterdir() if p.is_file())
    return hashlib.sha256(repr((str(model_dir.resolve()), stats)).encode()).hexdigest()[:16]
