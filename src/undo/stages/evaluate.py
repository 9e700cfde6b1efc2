"""Evaluate any checkpoint on an experiment's task (not cached: a measurement, not an artifact)."""

from __future__ import annotations

from typing import Any

from ..models import load_model
from ..tasks import build_task


def evaluate_model(model_path: str, exp) -> dict[str, Any]:
    task = build_task(exp.task, exp.seed)
    model, tok = load_model(model_path)
    return task.evaluate(model, tok)
