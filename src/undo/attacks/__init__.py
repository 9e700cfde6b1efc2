"""Attacks that try to bring unlearned knowledge back, one module each, registered by name in base.py."""

from .base import Attack, attack_class, attack_options, build_attack, known_attacks, register_attack

__all__ = ["Attack", "attack_class", "attack_options", "build_attack", "known_attacks", "register_attack"]
