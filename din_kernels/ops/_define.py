"""Definition of the per-backend ``torch.library`` ops from the one schema of each op (:mod:`.schema`).

``define(op, backend, fn, fake)`` makes ``din_kernels::<op>_<backend>`` with ``schema.SCHEMAS[op]``:

- ``reference`` and ``torch``: an opaque ``custom_op`` with ``fake`` as its fake (meta) implementation.
- ``triton``: on a GPU a ``torch.library.triton_op``, so ``torch.compile`` traces into the launcher and keeps the
  kernels; under ``TRITON_INTERPRET=1`` (kernels on the CPU), or without the ``triton`` package, an opaque
  ``custom_op`` (``wrap_triton`` hands interpreted kernels back unwrapped, so a ``triton_op`` could not be traced).

The compiled ops (``din_kernels::<op>``, no suffix) are defined in C++ (``csrc/register.cpp``) from the same
strings; :func:`compiled` returns one of them when the extension is loaded, after registering ``fake`` for it.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor

from .. import _extension
from .. import backend as _backend
from ..backend import triton_interpret
from .schema import SCHEMAS


def _mutated(schema: str) -> tuple[str, ...]:
    """The names of the arguments a schema marks as written (``Tensor(a!) name``)."""
    args = schema.split("->")[0]
    return tuple(part.split()[-1] for part in args.strip("() ").split(",") if "!)" in part)


_TYPES = {"Tensor": Tensor, "Tensor?": Optional[Tensor], "Tensor[]": list[Tensor], "str": str, "float": float,
          "bool": bool, "int": int, "int?": Optional[int]}


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.strip().strip("()").split(",") if part.strip()]


def _annotated(schema: str, fn: Callable) -> Callable:
    """``fn`` with the Python signature of ``schema`` (``triton_op`` infers its schema from type hints)."""
    args, returns = schema.split("->")
    params = []
    for part in _split(args):
        kind, name = part.rsplit(" ", 1)
        kind = "Tensor" if kind.startswith("Tensor(") else kind
        params.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_TYPES[kind]))
    outs = [_TYPES[part.split()[0]] for part in _split(returns)]
    one = len(outs) == 1 and not returns.strip().startswith("(")
    ret = None if not outs else outs[0] if one else tuple[tuple(outs)]

    signature = inspect.Signature(params, return_annotation=ret)

    @functools.wraps(fn)
    def typed(*a, **kw):
        return fn(*signature.bind(*a, **kw).args)

    typed.__signature__ = signature
    typed.__annotations__ = {p.name: p.annotation for p in params} | {"return": ret}
    return typed


def define(op: str, backend: str, fn: Callable, fake: Callable | None = None) -> Any:
    """``din_kernels::<op>_<backend>`` running ``fn`` (called with the schema's arguments, positionally)."""
    schema = SCHEMAS[op]
    name = f"din_kernels::{op}_{backend}"
    mutates = _mutated(schema)
    if backend == "triton" and not triton_interpret() and importlib.util.find_spec("triton") is not None:
        return torch.library.triton_op(name, _annotated(schema, fn), mutates_args=mutates)
    defined = torch.library.custom_op(name, fn, mutates_args=mutates, schema=schema)
    if fake is not None:
        defined.register_fake(fake)
    return defined


def compiled(op: str, fake: Callable | None = None) -> Any:
    """The compiled op ``din_kernels::<op>`` (``torch.ops`` overload), with ``fake`` registered, or None when the
    extension is not loaded."""
    if not _extension.loaded():
        return None
    overload = getattr(torch.ops.din_kernels, op).default
    if fake is not None:
        torch.library.register_fake(f"din_kernels::{op}", fake)
    return overload


@torch.compiler.assume_constant_result
def resolve(backend: str, device: torch.device, op: str, supported: tuple[str, ...],
            covering: tuple[str, ...] | None = None) -> str:
    """:func:`din_kernels.backend.resolve` with ``covers`` given as the tuple ``covering`` of the backends that cover
    the call (all when None). A constant for ``torch.compile``: Dynamo calls it while tracing and keeps the name, as
    it cannot trace the dispatcher queries that find the compiled extension's kernels."""
    return _backend.resolve(backend, device, op, supported, None if covering is None else covering.__contains__)
