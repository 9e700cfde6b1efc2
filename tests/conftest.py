import os

os.environ.setdefault("UNDO_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a hub

import torch

# Tiny models: one thread is as fast, and several processes (the 2-process DDP test, a
# parallel pytest) do not fight over cores.
torch.set_num_threads(1)

