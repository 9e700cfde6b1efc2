"""lm-evaluation-harness on a local checkpoint (`undo eval --harness`), for benchmarks undo
does not score itself. Optional: `pip install -e '.[lmeval]'` (lm-eval >= 0.4.13).

The model is loaded by lm-eval's own `hf` model from the directory (dtype "auto", its
tokenizer), as `lm_eval --model hf --model_args pretrained=DIR` would, and nothing is fetched
from the Hugging Face Hub: a task's data must be in the local cache or in local files (a
task YAML under --include-path that reads them, e.g. `dataset_path: json`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator, Optional

from .errors import UndoError

INSTALL = ("undo eval --harness needs lm-evaluation-harness, which is not installed; "
           "install it with: pip install -e '.[lmeval]'  (or: pip install 'lm-eval>=0.4.13')")
OFFLINE_FIX = ("put the dataset in the Hugging Face cache once on a machine with network, or give --include-path DIR "
               "with a task YAML that reads local files (dataset_path: json)")


def import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (the `hf` model needs torch + transformers)
    except ModuleNotFoundError:
        raise UndoError(INSTALL) from None
    return lm_eval


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """No Hub access for the duration: the environment for libraries imported later, and the
    flags that huggingface_hub and datasets read at import for those already imported."""
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    flags = [(m, "HF_HUB_OFFLINE") for m in (sys.modules.get("huggingface_hub.constants"),
                                              sys.modules.get("datasets.config")) if m is not None]
    saved = [(m, name, getattr(m, name)) for m, name in flags if hasattr(m, name)]
    for m, name, _ in saved:
        setattr(m, name, True)
    try:
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def task_manager(tasks: list[str], include_path: Optional[str]):
    """lm-eval's task index; only the local YAMLs when they hold every task asked for
    (indexing lm-eval's ~15k built-in tasks takes seconds)."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UndoError(f"--harness: lm-eval has no task {unknown[0]!r}; list them with `lm-eval ls tasks`, "
                        f"or give --include-path DIR with its YAML")
    return manager


def run_harness(model_dir: str, tasks: list[str], limit: Optional[int] = None, include_path: Optional[str] = None,
                batch_size: int = 8, device: Optional[str] = None) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` on `tasks` (zero-shot unless a task says otherwise);
    `limit`: the first N documents of each task, as lm-eval's --limit."""
    lm_eval = import_lm_eval()
    import torch
    from lm_eval.models.huggingface import HFLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with offline():
        manager = task_manager(tasks, include_path)
        model = HFLM(pretrained=model_dir, device=device, batch_size=batch_size)
        try:
            return lm_eval.simple_evaluate(model=model, tasks=tasks, limit=limit, task_manager=manager,
                                           log_samples=False)
        except ConnectionError as e:
            raise UndoError(f"lm-eval could not load a task's data offline ({e}); {OFFLINE_FIX}") from None
