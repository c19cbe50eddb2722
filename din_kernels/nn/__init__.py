"""Modules: TargetAttention, Dice, MBAEmbedding."""

from .attention import TargetAttention
from .dice import Dice
from .embedding import MBAEmbedding

__all__ = ["Dice", "MBAEmbedding", "TargetAttention"]
