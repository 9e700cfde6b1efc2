"""undo: robust unlearning for language models (unlearn, noise, distill on outputs)."""

__version__ = "0.1.0"

import logging as _logging

# transformers imports torchao (the quantize attack's library) whenever it is installed; its
# CUDA-only extensions then fail to load on a CPU machine, with warnings that mean nothing here.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
