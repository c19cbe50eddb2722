"""The in-memory layout shared by every dataset, batching (padded or jagged) and the preprocessing cache.

A dataset is held as user behaviour sequences plus samples that point into them, so a history is never copied per
sample:

- ``item_feats`` ``[I + 1, F]`` int64: the item fields of every goods id (column 0 is the goods id itself, column 1
  the category id, ...); row 0 is the padding item (all zeros). Id 0 is padding in every vocabulary.
- ``seq_values`` ``[N]`` / ``seq_offsets`` ``[U + 1]``: user u's behaviours in time order are
  ``seq_values[seq_offsets[u]:seq_offsets[u + 1]]`` (goods ids).
- ``user_feats`` ``[U, P]``: one-hot profile ids; ``user_multi[name]`` ``[U, L]``: multi-hot ids, 0-padded.
- each split (``train``, ``val``, ``test``) holds per sample ``uid`` ``[S]``, ``pos`` ``[S]`` (the history is the user's
  behaviours before position ``pos``, the most recent ``max_len`` of them), ``target`` ``[S]`` (the candidate's goods
  id), ``label`` ``[S]`` (1 = click) and ``context`` ``[S, C]``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..nn.din import FeatureSchema
from ..ops.mba import mba_counts

SPLITS = ("train", "val", "test")
_SAMPLE_KEYS = ("uid", "pos", "target", "label", "context")


@dataclass
class SeqData:
    """A dataset in the layout above; see the module docstring for every array's shape."""

    schema: FeatureSchema
    max_len: int
    item_feats: np.ndarray
    seq_values: np.ndarray
    seq_offsets: np.ndarray
    user_feats: np.ndarray
    user_multi: dict[str, np.ndarray]
    splits: dict[str, dict[str, np.ndarray]]
    info: dict = field(default_factory=dict)

    def num_samples(self, split: str) -> int:
        return int(self.splits[split]["uid"].shape[0])

    def batch(self, split: str, idx: np.ndarray, layout: str = "padded") -> dict[str, torch.Tensor]:
        """The samples ``idx`` of ``split`` as a model batch (see :class:`din_kernels.DIN`).

        ``layout="padded"``: ``hist`` ``[B, T, F]`` (T = the longest history of the batch) and ``hist_len`` ``[B]``;
        ``layout="jagged"``: ``hist`` ``[N, F]`` and ``hist_offsets`` ``[B + 1]`` (TorchRec's values + offsets).
        Also ``ad`` ``[B, F]``, ``user`` ``[B, P]``, each multi-hot field ``[B, L]``, ``context`` ``[B, C]``,
        ``label`` ``[B]`` float32 and ``uid`` ``[B]``.
        """
        if layout not in ("padded", "jagged"):
            raise ValueError(f"layout must be 'padded' or 'jagged', got {layout!r}")
        s = self.splits[split]
        uid, pos = s["uid"][idx], s["pos"][idx]
        length = np.minimum(pos, self.max_len)
        start = self.seq_offsets[uid] + pos - length
        out: dict[str, torch.Tensor] = {}
        if layout == "padded":
            T = int(length.max()) if length.size else 0
            cols = np.arange(T)
            valid = cols[None, :] < length[:, None]
            flat = np.where(valid, start[:, None] + cols[None, :], 0)
            goods = np.where(valid, self.seq_values[flat] if self.seq_values.size else 0, 0)
            out["hist"] = torch.from_numpy(self.item_feats[goods])
            out["hist_len"] = torch.from_numpy(length.astype(np.int64))
        else:
            offsets = np.zeros(len(idx) + 1, dtype=np.int64)
            np.cumsum(length, out=offsets[1:])
            within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], length)
            goods = self.seq_values[np.repeat(start, length) + within]
            out["hist"] = torch.from_numpy(self.item_feats[goods])
            out["hist_offsets"] = torch.from_numpy(offsets)
        out["ad"] = torch.from_numpy(self.item_feats[s["target"][idx]])
        out["user"] = torch.from_numpy(self.user_feats[uid])
        for name, table in self.user_multi.items():
            out[name] = torch.from_numpy(table[uid])
        out["context"] = torch.from_numpy(s["context"][idx])
        out["label"] = torch.from_numpy(s["label"][idx].astype(np.float32))
        out["uid"] = torch.from_numpy(uid)
        return out

    def iterate(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0, rank: int = 0,
                world_size: int = 1, drop_last: bool = False, layout: str = "padded",
                ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of ``split``. With ``world_size > 1`` each step takes a global batch of
        ``batch_size * world_size`` samples (one permutation shared by every rank, from ``seed``) and yields rank
        ``rank``'s contiguous slice of ``batch_size``, so one process with ``batch_size * world_size`` sees the same
        global batches."""
        n = self.num_samples(split)
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        step = batch_size * world_size
        stop = n - n % step if drop_last else n
        for lo in range(0, stop, step):
            chunk = order[lo:lo + step]
            per = -(-len(chunk) // world_size)
            mine = chunk[rank * per:(rank + 1) * per]
            yield self.batch(split, mine, layout)

    def num_batches(self, split: str, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
        n, step = self.num_samples(split), batch_size * world_size
        return n // step if drop_last else -(-n // step)

    def table_counts(self, split: str = "train", rank: int = 0, world_size: int = 1,
                     chunk: int = 65536) -> dict[str, torch.Tensor]:
        """MBA's ``n_j`` for every embedding table of the schema (:meth:`FeatureSchema.tables`): in how many
        samples of ``split`` id j occurs (ad and behaviours together for the item tables). With ``world_size > 1``
        only rank ``rank``'s share of the samples is counted: sum the results over the ranks (all_reduce)."""
        tables = self.schema.tables()
        counts = {name: torch.zeros(size, dtype=torch.long) for name, size in tables.items()}
        n = self.num_samples(split)
        idx_all = np.arange(rank, n, world_size)
        for lo in range(0, len(idx_all), chunk):
            b = self.batch(split, idx_all[lo:lo + chunk], "padded")
            for name, ids in self.schema.lookups(b).items():
                rows = torch.cat([t.reshape(t.shape[0], -1) for t in ids], 1)
                counts[name] += mba_counts(rows, tables[name], padding_idx=0)
        return counts

    # ---- cache -----------------------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        arrays = {"item_feats": self.item_feats, "seq_values": self.seq_values, "seq_offsets": self.seq_offsets,
                  "user_feats": self.user_feats}
        arrays.update({f"multi/{k}": v for k, v in self.user_multi.items()})
        for split, s in self.splits.items():
            arrays.update({f"{split}/{k}": v for k, v in s.items()})
        meta = {"schema": asdict(self.schema), "max_len": self.max_len, "info": self.info}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, __meta__=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> SeqData:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["__meta__"]))
            arrays = {k: z[k] for k in z.files if k != "__meta__"}
        schema = FeatureSchema.from_dict(meta["schema"])
        splits: dict[str, dict[str, np.ndarray]] = {}
        multi = {}
        for k, v in arrays.items():
            head, _, tail = k.partition("/")
            if head in SPLITS:
                splits.setdefault(head, {})[tail] = v
            elif head == "multi":
                multi[tail] = v
        return cls(schema, int(meta["max_len"]), arrays["item_feats"], arrays["seq_values"], arrays["seq_offsets"],
                   arrays["user_feats"], multi, splits, meta["info"])


def cache_path(cache_dir: str, name: str, sources: list[str], params: dict) -> str:
    """A cache file name keyed by the dataset, its parameters and the raw files' sizes and mtimes."""
    key = {"name": name, "params": params, "version": 1,
           "sources": [(os.path.basename(p), os.path.getsize(p), int(os.path.getmtime(p))) for p in sources]}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{name}-{digest}.npz")


def sequences_from_frame(uid: np.ndarray, item: np.ndarray, num_users: int) -> tuple[np.ndarray, np.ndarray]:
    """``(seq_values, seq_offsets)`` from behaviour rows already sorted by (user, time)."""
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(uid, minlength=num_users), out=offsets[1:])
    return item.astype(np.int64), offsets


def make_split(uid, pos, target, label, context=None) -> dict[str, np.ndarray]:
    uid = np.asarray(uid, dtype=np.int64)
    ctx = np.zeros((uid.shape[0], 0), dtype=np.int64) if context is None else np.asarray(context, dtype=np.int64)
    return {"uid": uid, "pos": np.asarray(pos, dtype=np.int64), "target": np.asarray(target, dtype=np.int64),
            "label": np.asarray(label, dtype=np.float32), "context": ctx}


def sample_negatives(rng: np.random.Generator, positives: np.ndarray, num_items: int) -> np.ndarray:
    """A uniform random goods id in [1, num_items] different from each positive."""
    neg = rng.integers(1, num_items, size=positives.shape[0])
    return neg + (neg >= positives)  # skip the positive: uniform over the other num_items - 1 ids
