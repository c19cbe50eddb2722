"""The TargetAttention module (SPEC section 1): DIN's local activation unit with weighted sum pooling."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .._validate import ACTIVATIONS, NORMALIZATIONS, check_choice
from ..backend import BACKENDS
from ..ops.attention import target_attention
from .dice import Dice, check_widths


def _make_activation(name: str, width: int, backend: str) -> nn.Module:
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "relu":
        return nn.ReLU()
    if name == "prelu":
        return nn.PReLU(width)
    return Dice(width, backend=backend)


class TargetAttention(nn.Module):
    """Scores every behaviour against the candidate with an MLP over ``[q, k, q - k, q * k]`` and pools the
    behaviours with the scores as weights.

    Args:
        embed_dim: D.
        hidden: the MLP's hidden widths ``(H1, ..., Hn)``, n >= 1 (an int is one hidden layer).
        activation: ``sigmoid`` (the original code) | ``relu`` | ``prelu`` | ``dice``.
        normalization: ``none`` (the paper: softmax abandoned) | ``softmax`` (the original code).
        softmax_scale: multiplies the scores before the softmax (default 1).
        backend: ``auto`` | ``reference`` | ``torch`` | ``triton`` | ``cuda`` | ``cpu``.
    Attributes:
        layers: ``nn.ModuleList`` of ``Linear(4D, H1), ..., Linear(Hn, 1)``.
        activations: ``nn.ModuleList`` of the n activation modules.
    """

    def __init__(self, embed_dim: int, hidden: Sequence[int] = (80, 40), activation: str = "sigmoid",
                 normalization: str = "none", softmax_scale: float | None = None, backend: str = "auto") -> None:
        super().__init__()
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("normalization", normalization, NORMALIZATIONS)
        check_choice("backend", backend, BACKENDS)
        check_widths("embed_dim", embed_dim)
        hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        if not hidden:
            raise ValueError("hidden must hold at least one hidden width, got ()")
        for i, h in enumerate(hidden):
            check_widths(f"hidden[{i}]", h)
        self.embed_dim, self.hidden = embed_dim, hidden
        self.activation, self.normalization, self.softmax_scale, self.backend = (
            activation, normalization, softmax_scale, backend)
        widths = (4 * embed_dim, *hidden, 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activations = nn.ModuleList(_make_activation(activation, h, backend) for h in hidden)

    def forward(self, query: Tensor, keys: Tensor, lengths: Tensor | None = None, offsets: Tensor | None = None,
                query_offsets: Tensor | None = None, return_scores: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``query`` [B, D]; ``keys`` [B, T, D] with ``lengths`` [B], or [N, D] with ``offsets`` [B + 1].

        With ``query_offsets`` [U + 1] (several candidates per history) ``query`` is [Nq, D] and the keys describe
        the U users (see :func:`din_kernels.target_attention`). Returns ``v_U`` [B, D], or ``(v_U, w)`` with ``w``
        [B, T] (padded) or [N] (jagged) when ``return_scores``.
        """
        act_weights, means, variances, eps, momentum = [], [], [], 1e-8, 0.1
        if self.activation == "prelu":
            act_weights = [a.weight for a in self.activations]
        elif self.activation == "dice":
            act_weights = [a.alpha for a in self.activations]
            means = [a.running_mean for a in self.activations]
            variances = [a.running_var for a in self.activations]
            eps = self._dice_eps()
            momentum = [a.momentum for a in self.activations]
        return target_attention(
            query, keys, [m.weight for m in self.layers], [m.bias for m in self.layers], lengths, offsets,
            query_offsets=query_offsets, activation=self.activation, act_weights=act_weights, act_means=means,
            act_vars=variances, normalization=self.normalization, softmax_scale=self.softmax_scale,
            training=self.training, momentum=momentum, dice_eps=eps, return_scores=return_scores, backend=self.backend,
        )

    def _dice_eps(self) -> float:
        """The one ``eps`` of the Dice layers (the fused kernels take one); raises for what they do not cover."""
        eps = {float(a.eps) for a in self.activations}
        if len(eps) > 1:
            raise ValueError(f"TargetAttention's Dice layers must share one eps, got "
                             f"{[a.eps for a in self.activations]}")
        if any(a.affine for a in self.activations):
            raise ValueError("TargetAttention's fused Dice has no affine variant (weight/bias inside the sigmoid); "
                             "use Dice(affine=False) for the attention's hidden layers")
        return eps.pop()

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, hidden={self.hidden}, activation={self.activation!r}, "
                f"normalization={self.normalization!r}, backend={self.backend!r}")
