"""The small frozen objects that carry an op's options and parameters between the functional API, the ops and
the backends (the ops' schemas, :mod:`din_kernels.ops.schema`, take them as flat arguments)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor


@dataclass(frozen=True)
class AttentionConfig:
    """The options of one target attention call (SPEC section 1).

    Attributes:
        activation: ``sigmoid`` | ``relu`` | ``prelu`` | ``dice``.
        normalization: ``none`` | ``softmax``.
        scale: the softmax's scale of the scores.
        training: Dice takes batch statistics over the valid behaviours when True (running ones when False).
        eps: Dice's epsilon.
    """

    activation: str = "sigmoid"
    normalization: str = "none"
    scale: float = 1.0
    training: bool = False
    eps: float = 1e-8

    @property
    def softmax(self) -> bool:
        return self.normalization == "softmax"

    @property
    def dice_training(self) -> bool:
        return self.activation == "dice" and self.training

    def op_args(self) -> tuple[str, str, float, bool, float]:
        """The schema's trailing arguments ``(activation, normalization, scale, training, eps)``."""
        return self.activation, self.normalization, float(self.scale), bool(self.training), float(self.eps)


class MLP(NamedTuple):
    """The attention MLP's tensors: ``weights``/``biases`` of ``Linear(4D, H1), ..., Linear(Hn, 1)``, the PReLU
    weights or Dice alphas ``act_weights`` (``[H_i]`` or ``[1]`` each, or none) and the Dice running statistics
    ``act_means``/``act_vars`` (``[H_i]`` each, or none)."""

    weights: list[Tensor]
    biases: list[Tensor]
    act_weights: list[Tensor]
    act_means: list[Tensor]
    act_vars: list[Tensor]

    @property
    def widths(self) -> list[int]:
        """The hidden widths ``[H1, ..., Hn]``."""
        return [int(w.shape[0]) for w in self.weights[:-1]]

    def op_args(self) -> tuple[list[Tensor], ...]:
        return tuple(list(x) for x in self)


class AttentionInputs(NamedTuple):
    """The leading tensors of an attention op: ``query`` [B, D] (or [Nq, D] with ``query_offsets``), ``keys``
    [B, T, D] with ``lengths`` [B] or [N, D] with ``offsets`` [B + 1] (B users with ``query_offsets`` [B + 1])."""

    query: Tensor
    keys: Tensor
    lengths: Tensor | None
    offsets: Tensor | None
    query_offsets: Tensor | None


class AttentionSaved(NamedTuple):
    """What a backward takes from its forward besides the inputs (see :mod:`din_kernels.ops.schema`):
    ``dice_stats`` [3, sum(H)], ``scores_acc``, ``out_acc`` [B, D] (softmax) and ``z1`` (or empty tensors)."""

    dice_stats: Tensor
    scores_acc: Tensor
    out_acc: Tensor
    z1: Tensor
