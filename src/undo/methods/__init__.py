"""Unlearning methods, one small module each, registered by name in base.py."""

from .base import Method, build_method, known_methods, method_class, resolve_options

__all__ = ["Method", "build_method", "known_methods", "method_class", "resolve_options"]
