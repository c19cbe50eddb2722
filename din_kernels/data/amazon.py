"""Amazon Electronics (the paper's protocol, section 6.1) from the raw SNAP files a user downloads.

Files in ``data_dir``: ``reviews_Electronics_5.json`` (or ``.json.gz``): one review a line with ``reviewerID``,
``asin``, ``unixReviewTime``; ``meta_Electronics.json`` (or ``.json.gz``): one item a line with ``asin`` and
``categories`` (a list of category paths; SNAP writes these lines as Python literals, which are parsed as such when
they are not strict JSON). An item's category is the last leaf, ``categories[-1][-1]`` ("unknown" without meta).

Protocol: per user, reviews sorted by time are the behaviours ``b_1..b_n``; every prefix ``b_1..b_k`` (k >= 1)
predicts ``b_{k+1}`` as a positive sample paired with a negative (a random other goods id). The prefix predicting
``b_n`` goes to test. For a ``val_frac`` share of the users the prefix predicting ``b_{n-1}`` is moved from train to
validation (model selection never looks at test). Users with fewer than 3 reviews give no validation sample.
The user id is a one-hot profile field.
"""

from __future__ import annotations

import ast
import gzip
import os

import numpy as np

from .._extras import require
from ..nn.din import FeatureSchema, Field
from .core import SeqData, cache_path, make_split, sample_negatives, sequences_from_frame

pd = require("pandas", "train")

REVIEWS = "reviews_Electronics_5.json"
META = "meta_Electronics.json"


def _find(data_dir: str, name: str) -> str:
    for candidate in (name, name + ".gz"):
        path = os.path.join(data_dir, candidate)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{name}(.gz) not found in {data_dir!r}: download it from the SNAP Amazon review data "
                            "(http://jmcauley.ucsd.edu/data/amazon/)")


def _read_lines(path: str, columns: list[str]) -> pd.DataFrame:
    """JSON lines with pandas; SNAP's Python-literal lines with ``ast.literal_eval`` when they are not JSON."""
    try:
        return pd.read_json(path, lines=True, compression="infer")[columns]
    except ValueError:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            rows = [ast.literal_eval(line) for line in f if line.strip()]
        return pd.DataFrame.from_records(rows).reindex(columns=columns)


def _leaf(categories) -> str:
    if isinstance(categories, (list, tuple)) and categories and isinstance(categories[-1], (list, tuple)) \
            and categories[-1]:
        return str(categories[-1][-1])
    return "unknown"


def load_amazon(data_dir: str, max_len: int = 50, val_frac: float = 0.1, seed: int = 0, cache: bool = True,
                embed_dim: int = 8) -> SeqData:
    """The dataset described in the module docstring, cached under ``data_dir/.din_cache``."""
    reviews_path, meta_path = _find(data_dir, REVIEWS), _find(data_dir, META)
    params = {"max_len": max_len, "val_frac": val_frac, "seed": seed, "embed_dim": embed_dim}
    path = cache_path(os.path.join(data_dir, ".din_cache"), "amazon", [reviews_path, meta_path], params)
    if cache and os.path.exists(path):
        return SeqData.load(path)
    reviews = _read_lines(reviews_path, ["reviewerID", "asin", "unixReviewTime"])
    meta = _read_lines(meta_path, ["asin", "categories"])
    meta = meta[meta["asin"].isin(set(reviews["asin"]))].drop_duplicates("asin")
    leaf = dict(zip(meta["asin"], meta["categories"].map(_leaf)))

    item_codes, item_index = pd.factorize(reviews["asin"], sort=True)
    user_codes, _ = pd.factorize(reviews["reviewerID"], sort=True)
    cate_codes, cate_index = pd.factorize(pd.Series([leaf.get(a, "unknown") for a in item_index]), sort=True)
    n_items, n_users = len(item_index), int(user_codes.max()) + 1 if len(user_codes) else 0
    item_feats = np.zeros((n_items + 1, 2), dtype=np.int64)
    item_feats[1:, 0] = np.arange(1, n_items + 1)
    item_feats[1:, 1] = cate_codes + 1

    frame = pd.DataFrame({"u": user_codes, "i": item_codes + 1, "t": reviews["unixReviewTime"].to_numpy()})
    frame = frame.sort_values(["u", "t", "i"], kind="stable")
    seq_values, seq_offsets = sequences_from_frame(frame["u"].to_numpy(), frame["i"].to_numpy(), n_users)
    lengths = np.diff(seq_offsets)

    # one sample per prefix k = 1 .. n - 1 (the prefix's length k is the history position)
    owner = np.repeat(np.arange(n_users), np.maximum(lengths - 1, 0))
    first = np.repeat(seq_offsets[:-1], np.maximum(lengths - 1, 0))
    k = np.arange(owner.size) - np.repeat(np.concatenate([[0], np.cumsum(np.maximum(lengths - 1, 0))[:-1]]),
                                          np.maximum(lengths - 1, 0)) + 1
    positive = seq_values[first + k]
    rng = np.random.default_rng(seed)
    negative = sample_negatives(rng, positive, n_items)
    last = k == lengths[owner] - 1
    val_users = rng.random(n_users) < val_frac
    to_val = (k == lengths[owner] - 2) & val_users[owner]
    splits = {}
    for name, sel in (("train", ~last & ~to_val), ("val", to_val), ("test", last)):
        u, p = owner[sel], k[sel]
        splits[name] = make_split(np.concatenate([u, u]), np.concatenate([p, p]),
                                  np.concatenate([positive[sel], negative[sel]]),
                                  np.concatenate([np.ones(sel.sum()), np.zeros(sel.sum())]))
    schema = FeatureSchema(
        item_fields=(Field("goods_id", n_items + 1, embed_dim), Field("cate_id", len(cate_index) + 1, embed_dim)),
        user_fields=(Field("user_id", n_users + 1, embed_dim),),
    )
    data = SeqData(schema, max_len, item_feats, seq_values, seq_offsets,
                   (np.arange(n_users, dtype=np.int64) + 1)[:, None], {}, splits,
                   {"dataset": "amazon", "users": n_users, "items": n_items, "categories": len(cate_index)})
    if cache:
        data.save(path)
    return data
