"""din_kernels: fast, faithful Deep Interest Network (DIN) ops for PyTorch.

Public names (SPEC.md): TargetAttention, target_attention, Dice, dice, mba_l2_, MBAEmbedding; the models DIN and
BaseModel; load_run, a saved training run; export and load, rank as an AOTInductor package.
"""

from .backend import BACKENDS, BackendUnavailableError, checks, checks_enabled, set_checks
from .nn import DIN, BaseModel, Dice, MBAEmbedding, TargetAttention
from .ops.attention import target_attention
from .ops.dice import dice
from .ops.mba import mba_counts, mba_l2_
from .runs import load_run
from .serving import export, load

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "BaseModel",
    "DIN",
    "Dice",
    "MBAEmbedding",
    "TargetAttention",
    "checks",
    "checks_enabled",
    "dice",
    "export",
    "load",
    "load_run",
    "mba_counts",
    "mba_l2_",
    "set_checks",
    "target_attention",
]
