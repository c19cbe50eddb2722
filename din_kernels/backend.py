"""The backend choice (SPEC section 4): one ``resolve()`` for every op family.

``"auto"`` picks the fastest backend available for the tensors' device; naming a backend that is not available
raises :class:`BackendUnavailableError` naming it and saying why. Nothing is swapped silently.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator

import torch

BACKENDS = ("auto", "reference", "torch", "triton", "cuda", "cpu")

_checks_enabled = True


class BackendUnavailableError(RuntimeError):
    """Raised when a named backend cannot run here (missing package, extension or device)."""


def checks_enabled() -> bool:
    """Whether ops validate ``lengths``/``offsets`` values (a device-to-host sync on a GPU)."""
    return _checks_enabled


def set_checks(enabled: bool) -> None:
    """Switch the value checks of ``lengths``/``offsets`` on or off for the whole process.

    With the checks off, kernels still clamp every index, so no memory outside the tensors is touched; invalid
    lengths/offsets then give unspecified (but memory-safe) results.
    """
    global _checks_enabled
    _checks_enabled = bool(enabled)


@contextlib.contextmanager
def checks(enabled: bool) -> Iterator[None]:
    """Context manager form of :func:`set_checks`: ``with din_kernels.checks(False): ...``."""
    previous = _checks_enabled
    set_checks(enabled)
    try:
        yield
    finally:
        set_checks(previous)


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_reason(device: torch.device) -> str | None:
    """None when the Triton backend can run on ``device``, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "the 'triton' package is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpret():
        return None
    return f"Triton needs a CUDA device (got {device.type!r}; set TRITON_INTERPRET=1 to run the kernels on the CPU)"


def _extension_reason(device: torch.device, name: str) -> str | None:
    if device.type != name:
        return f"the {name!r} backend runs on {name} tensors (got {device.type!r})"
    from . import _extension

    return _extension.unavailable_reason(name)


def unavailable_reason(backend: str, device: torch.device, op: str) -> str | None:
    """None when ``backend`` can run ``op`` on ``device``, otherwise a sentence saying why not."""
    if backend in ("reference", "torch"):
        return None
    if backend == "triton":
        return _triton_reason(device)
    if backend in ("cuda", "cpu"):
        return _extension_reason(device, backend)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve(backend: str, device: torch.device, op: str, supported: tuple[str, ...],
            covers: Callable[[str], bool] | None = None) -> str:
    """Turn ``backend`` into the concrete backend that runs ``op`` on ``device``.

    Args:
        backend: one of :data:`BACKENDS`.
        device: the device of the op's tensors.
        op: the op family's name, for messages.
        supported: the concrete backends that implement ``op``.
        covers: for ``"auto"``, whether a backend covers this call's sizes and dtypes (all when None); ``"auto"``
            takes the first available backend that does, in the order fastest first for the device type.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        # CUDA: Triton first until a GPU has measured the compiled CUDA kernels against it
        order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
        for name in order:
            if name in supported and unavailable_reason(name, device, op) is None and (covers is None or covers(name)):
                return name
        return "torch"
    if backend not in supported:
        raise BackendUnavailableError(f"backend {backend!r} does not implement {op} (available: {supported})")
    reason = unavailable_reason(backend, device, op)
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend!r} is not available for {op}: {reason}")
    return backend
