import os

os.environ.setdefault("UNDO_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a hub

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def small_arith_options():
    from undo.tasks.arithmetic import ArithmeticOptions

    return ArithmeticOptions(examples_per_operation=200, eval_per_format=8, quick_eval_per_format=4)
