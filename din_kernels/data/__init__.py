"""Datasets in one layout (:class:`SeqData`): ``synthetic`` (the default), ``amazon`` and ``movielens``.

``synthetic`` needs the core only (numpy); the raw-file readers ``amazon`` and ``movielens`` use pandas (the ``train``
extra) and are imported when first used.
"""

from __future__ import annotations

import importlib

from .core import SeqData
from .synthetic import SyntheticConfig, generate_synthetic

DATASETS = ("synthetic", "amazon", "movielens")
_READERS = {"load_amazon": ".amazon", "load_movielens": ".movielens"}


def __getattr__(name: str):
    if name in _READERS:
        return getattr(importlib.import_module(_READERS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_dataset(name: str, data_dir: str | None = None, seed: int = 0, max_len: int = 50,
                 synthetic: SyntheticConfig | None = None) -> SeqData:
    """``synthetic`` is generated from ``seed`` (or ``synthetic``'s own seed when a config is given); ``amazon`` and
    ``movielens`` read the raw files in ``data_dir`` (a second call reads the cache)."""
    if name == "synthetic":
        config = synthetic or SyntheticConfig(seed=seed)
        return generate_synthetic(config, max_len)
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if data_dir is None:
        raise ValueError(f"dataset {name!r} needs --data-dir, the folder of its raw files")
    loader = __getattr__("load_amazon" if name == "amazon" else "load_movielens")
    return loader(data_dir, max_len=max_len, seed=seed)


__all__ = ["DATASETS", "SeqData", "SyntheticConfig", "generate_synthetic", "load_amazon", "load_dataset",
           "load_movielens"]
