"""Drop-in replacements for DeepCTR-Torch 0.3.0's DIN layers, running on din_kernels' ops.

``AttentionSequencePoolingLayer`` and ``Dice`` take the constructor arguments and forward inputs of
``deepctr_torch.layers.sequence.AttentionSequencePoolingLayer`` and ``deepctr_torch.layers.activation.Dice``,
have the same submodules and ``state_dict`` keys (a checkpoint loads either way), and compute the same outputs and
gradients (tested against the installed deepctr-torch 0.3.0). DeepCTR-Torch is licensed under Apache-2.0; the
module layout and the semantics below follow its source.

Where DeepCTR-Torch departs from the paper / SPEC.md, ``compat=True`` (the default) reproduces it and
``compat=False`` uses the SPEC semantics:

- **Dice statistics over padding.** Its Dice is a ``BatchNorm1d`` over every position of the ``[B, T, H]``
  attention activations, padded behaviours included; SPEC takes them over the valid behaviours only.
- **Softmax padding constant.** With ``weight_normalization=True`` padded scores are set to ``-2**32 + 1`` before
  the softmax. For a row with valid behaviours this equals a softmax over the valid positions (exp underflows to 0
  in float32/64), but a row with no behaviours gets uniform weights ``1 / T`` and returns the mean of its (padding)
  keys, where SPEC gives 0. (In float16 the constant overflows to -inf and such rows become NaN; the compat mode
  returns the float32 answer instead.)
- **PReLU** is ``nn.PReLU()`` with one shared slope per layer (SPEC's module uses one per channel); both are the
  same function here.

With activation ``sigmoid``, ``relu`` or ``prelu`` and length-based masking the layer runs the fused
:func:`din_kernels.target_attention` op (factorised first layer, no ``[B, T, 4D]`` concatenation) with the
``backend`` given; Dice, ``linear``, activation classes and ``supports_masking=True`` (an arbitrary mask) take the
explicit path: the same MLP with :func:`din_kernels.dice` for Dice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.attention import target_attention
from ..ops.dice import dice

_FUSED = ("sigmoid", "relu", "prelu")


class Dice(nn.Module):
    """DeepCTR-Torch's ``Dice(emb_size, dim=2, epsilon=1e-8, device='cpu')`` on :func:`din_kernels.dice`.

    ``sigmoid(BatchNorm1d(x))`` gates ``x`` against ``alpha * x`` per channel; the batch norm is affine
    (``bn.weight``, ``bn.bias``) and updates ``bn.running_mean``/``bn.running_var``/``bn.num_batches_tracked`` like
    ``nn.BatchNorm1d``.

    Shape: ``dim=2``: ``x`` ``[B, C]``; ``dim=3``: ``x`` ``[B, T, C]`` (statistics over B and T). ``mask``
    (``x.shape[:-1]`` bool, optional, not in DeepCTR-Torch) restricts the statistics to the True positions.
    """

    def __init__(self, emb_size: int, dim: int = 2, epsilon: float = 1e-8, device: str = "cpu",
                 backend: str = "auto") -> None:
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 ([B, C]) or 3 ([B, T, C]), got {dim}")
        self.bn = nn.BatchNorm1d(emb_size, eps=epsilon)
        self.sigmoid = nn.Sigmoid()
        self.dim, self.backend = dim, backend
        self.alpha = nn.Parameter(torch.zeros((emb_size,) if dim == 2 else (emb_size, 1)))
        self.to(device)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if x.dim() != self.dim:
            raise ValueError(f"x must be {self.dim}-D for Dice(dim={self.dim}), got shape {tuple(x.shape)}")
        bn = self.bn
        use_batch = self.training or not bn.track_running_stats
        momentum = bn.momentum
        if self.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            if momentum is None:
                momentum = 1.0 / float(bn.num_batches_tracked)
        return dice(x, self.alpha.reshape(-1), bn.running_mean if bn.track_running_stats else None,
                    bn.running_var if bn.track_running_stats else None, bn.weight, bn.bias, mask, use_batch,
                    momentum if momentum is not None else 0.0, bn.eps, self.backend)


class Identity(nn.Module):
    def forward(self, inputs: Tensor) -> Tensor:
        return inputs


def _activation(act, hidden_size: int, dice_dim: int, backend: str) -> nn.Module:
    """DeepCTR-Torch's ``activation_layer`` with our Dice."""
    if isinstance(act, str):
        name = act.lower()
        table = {"sigmoid": nn.Sigmoid, "linear": Identity, "relu": lambda: nn.ReLU(inplace=True),
                 "prelu": nn.PReLU, "dice": lambda: Dice(hidden_size, dice_dim, backend=backend)}
        if name not in table:
            raise NotImplementedError(f"activation {act!r} is not one of {sorted(table)}")
        return table[name]()
    if isinstance(act, type) and issubclass(act, nn.Module):
        return act()
    raise NotImplementedError(f"activation must be a name or an nn.Module class, got {act!r}")


class _DNN(nn.Module):
    """The attribute layout of DeepCTR-Torch's ``DNN`` (no batch norm, no dropout: the attention layer's use)."""

    def __init__(self, inputs_dim: int, hidden_units: Sequence[int], activation, dice_dim: int, init_std: float,
                 backend: str) -> None:
        super().__init__()
        if len(hidden_units) == 0:
            raise ValueError("hidden_units is empty")
        widths = [inputs_dim, *hidden_units]
        self.dropout = nn.Dropout(0)
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activation_layers = nn.ModuleList(_activation(activation, h, dice_dim, backend) for h in widths[1:])
        for name, tensor in self.linears.named_parameters():
            if "weight" in name:
                nn.init.normal_(tensor, mean=0, std=init_std)


class LocalActivationUnit(nn.Module):
    """DeepCTR-Torch's ``LocalActivationUnit`` layout: ``dnn`` (``linears``, ``activation_layers``) and ``dense``."""

    def __init__(self, hidden_units: Sequence[int] = (64, 32), embedding_dim: int = 4, activation="sigmoid",
                 dice_dim: int = 3, backend: str = "auto") -> None:
        super().__init__()
        self.dnn = _DNN(4 * embedding_dim, hidden_units, activation, dice_dim, 1e-4, backend)
        self.dense = nn.Linear(hidden_units[-1], 1)

    def forward(self, query: Tensor, user_behavior: Tensor, mask: Tensor | None = None) -> Tensor:
        """``query`` ``[B, 1, E]``, ``user_behavior`` ``[B, T, E]`` -> scores ``[B, T, 1]`` (the explicit path)."""
        q = query.expand(-1, user_behavior.size(1), -1)
        h = torch.cat([q, user_behavior, q - user_behavior, q * user_behavior], dim=-1)
        for linear, act in zip(self.dnn.linears, self.dnn.activation_layers):
            h = act(linear(h), mask) if isinstance(act, Dice) else act(linear(h))
        return self.dense(h)


class AttentionSequencePoolingLayer(nn.Module):
    """DeepCTR-Torch's ``AttentionSequencePoolingLayer`` (DIN's attention pooling) on din_kernels' ops.

    Args: as DeepCTR-Torch (``att_hidden_units``, ``att_activation``, ``weight_normalization``, ``return_score``,
    ``supports_masking``, ``embedding_dim``), plus ``compat`` (see the module docstring) and ``backend``.

    forward(query ``[B, 1, E]``, keys ``[B, T, E]``, keys_length ``[B, 1]`` (int), mask ``[B, T]`` (with
    ``supports_masking``)) -> ``[B, 1, E]``, or the weights ``[B, 1, T]`` when ``return_score``.
    """

    def __init__(self, att_hidden_units: Sequence[int] = (80, 40), att_activation="sigmoid",
                 weight_normalization: bool = False, return_score: bool = False, supports_masking: bool = False,
                 embedding_dim: int = 4, compat: bool = True, backend: str = "auto", **kwargs) -> None:
        super().__init__()
        self.return_score = return_score
        self.weight_normalization = weight_normalization
        self.supports_masking = supports_masking
        self.compat, self.backend = compat, backend
        self.att_activation = att_activation.lower() if isinstance(att_activation, str) else att_activation
        self.local_att = LocalActivationUnit(hidden_units=att_hidden_units, embedding_dim=embedding_dim,
                                             activation=att_activation, backend=backend)

    def forward(self, query: Tensor, keys: Tensor, keys_length: Tensor, mask: Tensor | None = None) -> Tensor:
        B, T, E = keys.shape
        if query.shape != (B, 1, E):
            raise ValueError(f"query must have shape [B, 1, E] = [{B}, 1, {E}] for keys {tuple(keys.shape)}, "
                             f"got {tuple(query.shape)}")
        if self.supports_masking:
            if mask is None:
                raise ValueError("When supports_masking=True,input must support masking")
            valid = mask.reshape(B, T).bool()
            return self._explicit(query, keys, valid)
        if keys_length.numel() != B:
            raise ValueError(f"keys_length must hold B = {B} lengths ([B, 1]), got shape {tuple(keys_length.shape)}")
        lengths = keys_length.reshape(B).long().clamp(0, T)
        if self.att_activation in _FUSED:
            return self._fused(query, keys, lengths)
        valid = torch.arange(T, device=keys.device)[None, :] < lengths[:, None]
        return self._explicit(query, keys, valid)

    def _fused(self, query: Tensor, keys: Tensor, lengths: Tensor) -> Tensor:
        dnn, dense = self.local_att.dnn, self.local_att.dense
        act_weights = [a.weight for a in dnn.activation_layers] if self.att_activation == "prelu" else []
        out, w = target_attention(
            query.squeeze(1), keys, [m.weight for m in dnn.linears] + [dense.weight],
            [m.bias for m in dnn.linears] + [dense.bias], lengths, activation=self.att_activation,
            act_weights=act_weights, normalization="softmax" if self.weight_normalization else "none",
            return_scores=True, backend=self.backend)
        if self.compat and self.weight_normalization and keys.shape[1] > 0:
            empty = (lengths == 0)[:, None]
            w = torch.where(empty, torch.full_like(w, 1.0 / keys.shape[1]), w)
            out = torch.where(empty, keys.mean(1), out)
        return w.unsqueeze(1) if self.return_score else out.unsqueeze(1)

    def _explicit(self, query: Tensor, keys: Tensor, valid: Tensor) -> Tensor:
        scores = self.local_att(query, keys, None if self.compat else valid).transpose(1, 2)  # [B, 1, T]
        keys_masks = valid.unsqueeze(1)
        if self.weight_normalization:
            if self.compat:
                scores = torch.where(keys_masks, scores, torch.full_like(scores, -(2**32) + 1))
                weights = F.softmax(scores.float() if scores.dtype == torch.float16 else scores, dim=-1)
                weights = weights.to(scores.dtype)
            else:
                top = torch.where(keys_masks, scores, torch.full_like(scores, float("-inf"))).amax(-1, keepdim=True)
                shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
                e = torch.where(keys_masks, torch.exp((scores - shift).clamp_max(0)), torch.zeros_like(scores))
                weights = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)
        else:
            weights = torch.where(keys_masks, scores, torch.zeros_like(scores))
        return weights if self.return_score else torch.matmul(weights, keys)
