"""The Dice module (SPEC section 2)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.dice import dice


class Dice(nn.Module):
    """Dice, the data-adaptive activation of DIN (the paper's eq. 9).

    ``f(s) = p(s) * s + (1 - p(s)) * alpha * s`` with ``p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps))`` per
    channel (the last dim). Training uses the batch statistics (over ``mask`` positions when given) and updates the
    running ones like ``nn.BatchNorm1d``; eval uses the running statistics.

    Args:
        num_features: C, the channel count.
        eps: added to the variance (the paper: 1e-8).
        momentum: of the running statistics.
        affine: ``sigmoid(weight * z + bias)`` with learnable ``weight``/``bias`` (DeepCTR-Torch's variant).
        backend: see :mod:`din_kernels.backend`.
    Shape: ``x`` ``[..., C]``, ``mask`` ``x.shape[:-1]`` bool; output like ``x``.
    """

    def __init__(self, num_features: int, eps: float = 1e-8, momentum: float = 0.1, affine: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.backend = affine, backend
        self.alpha = nn.Parameter(torch.zeros(num_features))
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return dice(x, self.alpha, self.running_mean, self.running_var, self.weight, self.bias, mask, self.training,
                    self.momentum, self.eps, self.backend)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"backend={self.backend!r}")
