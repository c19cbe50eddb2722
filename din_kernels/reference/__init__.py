"""The literal formulas of SPEC.md in plain PyTorch: the oracle of every test. Never imports a backend."""

from .attention import target_attention_ref
from .dice import dice_ref, masked_moments
from .mba import mba_l2_ref

__all__ = ["dice_ref", "masked_moments", "mba_l2_ref", "target_attention_ref"]
