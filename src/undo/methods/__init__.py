"""Unlearning methods, one small module each, registered by name in base.py."""

from .base import AuxModel, Method, build_method, known_methods, method_class, register_method, resolve_options

__all__ = ["AuxModel", "Method", "build_method", "known_methods", "method_class", "register_method", "resolve_options"]
