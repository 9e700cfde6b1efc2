"""undo: robust unlearning for language models (unlearn, noise, distill on outputs)."""

__version__ = "0.1.0"
