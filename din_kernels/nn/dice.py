"""The Dice module (SPEC section 2)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._validate import check_choice
from ..backend import BACKENDS
from ..ops.dice import dice


def check_widths(name: str, value: object) -> None:
    """A layer width: a positive int (``ValueError``/``TypeError`` naming ``name`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


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
    Shape: ``x`` ``[..., N, C]`` (at least 2-D), ``mask`` ``x.shape[:-1]`` bool; output like ``x``. A training
    batch whose statistics are not finite (NaN or Inf in the input) leaves the running statistics unchanged.
    """

    def __init__(self, num_features: int, eps: float = 1e-8, momentum: float = 0.1, affine: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        check_widths("num_features", num_features)
        check_choice("backend", backend, BACKENDS)
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not 0 <= momentum <= 1:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
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

    def reset_running_stats(self) -> None:
        """Running mean 0 and variance 1, as a new module has (``nn.BatchNorm1d.reset_running_stats``)."""
        self.running_mean.zero_()
        self.running_var.fill_(1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return dice(x, self.alpha, self.running_mean, self.running_var, self.weight, self.bias, mask, self.training,
                    self.momentum, self.eps, self.backend)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"backend={self.backend!r}")
