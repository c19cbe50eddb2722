"""Output allocation shared by the backends, with a test switch that poisons fresh buffers with NaN.

A kernel that forgets to write an element of its output then fails the comparison with the reference.
"""

from __future__ import annotations

import torch

poison = False


def empty(*shape, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty``; NaN-filled (or -1 for integer dtypes) while ``poison`` is set."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    if poison:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out
