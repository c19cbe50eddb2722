"""The optional dependencies and the extra of ``pip install 'din_kernels[EXTRA]'`` that brings each.

The core (``import din_kernels``: the ops, the modules, the models, the synthetic data, checkpoints) needs torch and
numpy only. ``train``: what ``python -m din_kernels train`` / ``eval`` need (the metrics, the raw data readers,
progress bars). ``plots``: the run's ``curves.png`` and ``attention.png``. ``torchrec``: ``din_kernels.torchrec``
and ``train --engine torchrec``, pinned to a torch, fbgemm and torchrec that work together; torchrec itself is
installed without its dependencies (:data:`NO_DEPS`: its metadata asks for the CUDA build of fbgemm, the extra brings
the CPU build). Keep this table and setup.py's ``extras_require`` in step (tests/test_packaging.py checks it).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# extra -> ((module to import, distribution to install), ...)
EXTRAS: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (("pandas", "pandas"), ("sklearn", "scikit-learn"), ("tqdm", "tqdm")),
    "plots": (("matplotlib", "matplotlib"),),
    "torchrec": (("torch", "torch"), ("fbgemm_gpu", "fbgemm-gpu-cpu"), ("tensordict", "tensordict"),
                 ("torchmetrics", "torchmetrics"), ("pyre_extensions", "pyre-extensions")),
}
# extra -> ((module, pinned requirement installed with --no-deps after the extra), ...)
NO_DEPS: dict[str, tuple[tuple[str, str], ...]] = {"torchrec": (("torchrec", "torchrec==1.8.0"),)}


def install_hint(extra: str) -> str:
    """The command that installs ``extra``."""
    hint = f"pip install 'din_kernels[{extra}]'"
    if extra in NO_DEPS:
        hint += " && pip install --no-deps " + " ".join(req for _, req in NO_DEPS[extra])
    return hint


def missing(extra: str) -> list[str]:
    """The distributions of ``extra`` whose module cannot be imported (empty when all are there)."""
    out = []
    for module, dist in EXTRAS[extra] + tuple((m, req.split("==")[0]) for m, req in NO_DEPS.get(extra, ())):
        try:
            importlib.import_module(module)
        except ImportError:
            out.append(dist)
    return out


def missing_message(extra: str, what: str) -> str | None:
    """``"<what> needs A and B, which are not installed: pip install ..."``, or None when nothing is missing."""
    names = missing(extra)
    if not names:
        return None
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    verb = "is" if len(names) == 1 else "are"
    return f"{what} needs {listed}, which {verb} not installed: {install_hint(extra)}"


def require(module: str, extra: str) -> ModuleType:
    """``import module``, or a ``ModuleNotFoundError`` that names the extra which brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        dist = dict(EXTRAS[extra]).get(module.split(".")[0], module.split(".")[0])
        raise ModuleNotFoundError(f"{module} is not installed (the {dist!r} package): {install_hint(extra)}",
                                  name=e.name) from e
