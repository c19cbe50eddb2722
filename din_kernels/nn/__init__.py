"""Modules: TargetAttention, Dice, MBAEmbedding, DIN, BaseModel."""

from .attention import TargetAttention
from .dice import Dice
from .din import DIN, BaseModel
from .embedding import MBAEmbedding

__all__ = ["DIN", "BaseModel", "Dice", "MBAEmbedding", "TargetAttention"]
