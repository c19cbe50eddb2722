"""Datasets: the synthetic generator, Amazon and MovieLens from small files in the raw formats, batching, cache."""

import gzip
import json
import os

import numpy as np
import pytest
import torch

from din_kernels.data import amazon as amazon_mod
from din_kernels.data import load_dataset
from din_kernels.data import movielens as ml_mod
from din_kernels.data.core import SeqData
from din_kernels.data.synthetic import SyntheticConfig, generate_synthetic


def _history(data, split, i):
    s = data.splits[split]
    u, p = s["uid"][i], s["pos"][i]
    return data.seq_values[data.seq_offsets[u]:data.seq_offsets[u] + p][-data.max_len:]


# ---- synthetic --------------------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_and_split_by_user():
    a = generate_synthetic(SyntheticConfig.tiny(seed=5))
    b = generate_synthetic(SyntheticConfig.tiny(seed=5))
    c = generate_synthetic(SyntheticConfig.tiny(seed=6))
    assert np.array_equal(a.seq_values, b.seq_values) and np.array_equal(a.splits["test"]["label"],
                                                                          b.splits["test"]["label"])
    assert not np.array_equal(a.seq_values, c.seq_values)
    users = [set(a.splits[k]["uid"].tolist()) for k in ("train", "val", "test")]
    assert not (users[0] & users[1]) and not (users[0] & users[2]) and not (users[1] & users[2])
    assert sum(a.num_samples(k) for k in ("train", "val", "test")) == 300 * 6
    cfg = SyntheticConfig.tiny()
    # item fields: goods id, category = cluster // styles + 1
    i = np.arange(1, a.item_feats.shape[0])
    assert np.array_equal(a.item_feats[1:, 1], (i - 1) // (cfg.items_per_style * cfg.styles_per_category) + 1)


def test_synthetic_clicks_follow_a_few_relevant_behaviours():
    cfg = SyntheticConfig(num_users=3000, seed=1)
    d = generate_synthetic(cfg)
    s = d.splits["train"]
    cluster = lambda ids: (ids - 1) // cfg.items_per_style
    match = np.array([(cluster(_history(d, "train", i)) == cluster(s["target"][i])).any()
                      for i in range(d.num_samples("train"))])
    ctr_match, ctr_other = s["label"][match].mean(), s["label"][~match].mean()
    assert ctr_match > ctr_other + 0.35, (ctr_match, ctr_other)
    # the effect does not fade with history length (it depends on the relevant behaviours, not the average)
    long = s["pos"] >= 30
    assert s["label"][match & long].mean() > s["label"][~match & long].mean() + 0.35


# ---- batching -----------------------------------------------------------------------------------------------------
def test_padded_and_jagged_batches_hold_the_recent_history():
    d = generate_synthetic(SyntheticConfig.tiny(seed=2), max_len=5)
    idx = np.array([3, 0, 17, 9])
    pad, jag = d.batch("train", idx, "padded"), d.batch("train", idx, "jagged")
    offsets = jag["hist_offsets"]
    for r, i in enumerate(idx):
        hist = _history(d, "train", i)
        L = len(hist)
        assert L == min(d.splits["train"]["pos"][i], 5) and int(pad["hist_len"][r]) == L
        assert np.array_equal(pad["hist"][r, :L, 0].numpy(), hist)
        assert np.array_equal(pad["hist"][r, :L, 1].numpy(), d.item_feats[hist, 1])
        assert (pad["hist"][r, L:] == 0).all()
        assert np.array_equal(jag["hist"][offsets[r]:offsets[r + 1], 0].numpy(), hist)
    assert pad["ad"].shape == (4, 2) and pad["label"].dtype == torch.float32
    with pytest.raises(ValueError, match="layout"):
        d.batch("train", idx, "ragged")


def test_iterate_shards_one_global_batch_across_ranks():
    d = generate_synthetic(SyntheticConfig.tiny(seed=2))
    single = list(d.iterate("train", 8, shuffle=True, seed=4, drop_last=True))
    ranks = [list(d.iterate("train", 4, shuffle=True, seed=4, rank=r, world_size=2, drop_last=True))
             for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == d.num_samples("train") // 8
    for k, b in enumerate(single):
        joined = torch.cat([ranks[0][k]["uid"], ranks[1][k]["uid"]])
        assert torch.equal(joined, b["uid"])


def test_cache_roundtrip(tmp_path):
    d = generate_synthetic(SyntheticConfig.tiny(seed=2))
    path = str(tmp_path / "c.npz")
    d.save(path)
    e = SeqData.load(path)
    assert e.schema == d.schema and e.max_len == d.max_len
    for split in ("train", "test"):
        for k, v in d.splits[split].items():
            assert np.array_equal(e.splits[split][k], v)
    assert np.array_equal(e.user_multi["tags"], d.user_multi["tags"])


# ---- Amazon -------------------------------------------------------------------------------------------------------
def _write_amazon(folder, gz):
    rng = np.random.default_rng(0)
    items = [f"B{i:04d}" for i in range(12)]
    reviews, truth = [], {}
    for u in range(9):
        n = 2 + u % 4 if u < 8 else len(items)  # the last user reviews every item
        chosen = rng.choice(items, n, replace=False)
        times = rng.permutation(np.arange(1000, 1000 + n * 10, 10))
        for a, t in zip(chosen, times):
            reviews.append({"reviewerID": f"U{u}", "asin": str(a), "unixReviewTime": int(t), "overall": 5.0})
        truth[f"U{u}"] = [str(a) for _, a in sorted(zip(times, chosen))]
    text = "\n".join(json.dumps(r) for r in reviews) + "\n"
    if gz:
        with gzip.open(os.path.join(folder, "reviews_Electronics_5.json.gz"), "wt") as f:
            f.write(text)
    else:
        open(os.path.join(folder, "reviews_Electronics_5.json"), "w").write(text)
    # SNAP's meta file: Python literals with single quotes (not JSON)
    meta = [repr({"asin": a, "categories": [["Electronics", "Computers", f"Leaf{i % 3}"], ["Other", f"X{i % 3}"]]})
            for i, a in enumerate(items[:-1])]  # the last item has no meta: category "unknown"
    open(os.path.join(folder, "meta_Electronics.json"), "w").write("\n".join(meta) + "\n")
    return truth


@pytest.mark.parametrize("gz", [False, True])
def test_amazon_protocol(tmp_path, gz, monkeypatch):
    truth = _write_amazon(str(tmp_path), gz)
    d = amazon_mod.load_amazon(str(tmp_path), val_frac=0.5, seed=1)
    users = sorted(truth)
    items = sorted({a for seq in truth.values() for a in seq})
    code = {a: i + 1 for i, a in enumerate(items)}
    test = d.splits["test"]
    assert d.num_samples("test") == 2 * len(users)  # one positive + one negative per user
    for i in range(d.num_samples("test")):
        seq = truth[users[test["uid"][i]]]
        assert np.array_equal(_history(d, "test", i), [code[a] for a in seq[:-1]])
        if test["label"][i] == 1:
            assert test["target"][i] == code[seq[-1]]
        else:
            assert test["target"][i] not in (0, code[seq[-1]])
    n_prefix = sum(len(s) - 1 for s in truth.values())
    assert sum(d.num_samples(k) for k in ("train", "val", "test")) == 2 * n_prefix
    val = d.splits["val"]
    assert d.num_samples("val") > 0
    for i in range(d.num_samples("val")):  # the prefix predicting the second-to-last item
        seq = truth[users[val["uid"][i]]]
        assert val["pos"][i] == len(seq) - 2 and len(seq) >= 3
    # category = last leaf of the last category path; items without meta -> "unknown"
    cates = {a: d.item_feats[code[a], 1] for a in items}
    assert cates["B0000"] == cates["B0003"] != cates["B0001"]
    assert len({cates["B0011"], cates["B0000"], cates["B0001"], cates["B0002"]}) == 4
    assert d.schema.tables()["cate_id"] == 5  # X0, X1, X2, unknown + padding
    # second load: from the cache, no parsing
    monkeypatch.setattr(amazon_mod, "_read_lines", lambda *a: (_ for _ in ()).throw(AssertionError("parsed")))
    e = amazon_mod.load_amazon(str(tmp_path), val_frac=0.5, seed=1)
    assert np.array_equal(e.splits["train"]["target"], d.splits["train"]["target"])
    assert os.listdir(tmp_path / ".din_cache")


def test_amazon_missing_files_name_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="reviews_Electronics_5.json"):
        load_dataset("amazon", str(tmp_path))
    with pytest.raises(ValueError, match="data-dir"):
        load_dataset("movielens")


# ---- MovieLens ----------------------------------------------------------------------------------------------------
def _ratings(n_users=25, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, n_users + 1):
        for m in rng.choice(np.arange(1, 11), 6, replace=False):
            rows.append((u, int(m), int(rng.integers(1, 6)), int(rng.integers(0, 4)) * 100 + u))
    return rows


GENRES = {m: g for m, g in zip(range(1, 11), ["Action", "Comedy", "Drama"] * 4)}


def _write_movielens(folder, fmt, rows):
    if fmt == "100k":
        open(os.path.join(folder, "u.data"), "w").write("".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in rows))
        names = list(ml_mod.ML100K_GENRES)
        lines = []
        for m in range(1, 11):
            flags = ["0"] * len(names)
            flags[names.index(GENRES[m])] = "1"
            flags[names.index("War")] = "1"  # a second genre: the first listed one is the category
            lines.append("|".join([str(m), f"Movie {m} (1995)", "01-Jan-1995", "", "http://x"] + flags))
        open(os.path.join(folder, "u.item"), "w", encoding="latin-1").write("\n".join(lines) + "\n")
    elif fmt == "1m":
        open(os.path.join(folder, "ratings.dat"), "w").write("".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in rows))
        open(os.path.join(folder, "movies.dat"), "w", encoding="latin-1").write(
            "".join(f"{m}::Movie {m} (1995)::{GENRES[m]}|War\n" for m in range(1, 11)))
    else:
        open(os.path.join(folder, "ratings.csv"), "w").write(
            "userId,movieId,rating,timestamp\n" + "".join(f"{u},{m},{r}.0,{t}\n" for u, m, r, t in rows))
        open(os.path.join(folder, "movies.csv"), "w").write(
            "movieId,title,genres\n" + "".join(f'{m},"Movie {m}, The (1995)",{GENRES[m]}|War\n' for m in range(1, 11)))


@pytest.mark.parametrize("fmt", ["100k", "1m", "20m"])
def test_movielens_formats_and_protocol(tmp_path, fmt):
    rows = _ratings()
    _write_movielens(str(tmp_path), fmt, rows)
    d = load_dataset("movielens", str(tmp_path), max_len=3)
    assert sum(d.num_samples(k) for k in ("train", "val", "test")) == len(rows)
    train_users = set(d.splits["train"]["uid"].tolist()) | set(d.splits["val"]["uid"].tolist())
    test_users = set(d.splits["test"]["uid"].tolist())
    assert not train_users & test_users and round(0.72 * 25) == len(train_users)
    assert not set(d.splits["train"]["uid"].tolist()) & set(d.splits["val"]["uid"].tolist())
    # genre of movie m (ids are the sorted raw ids, so code m == raw m): its first listed genre
    genre_code = {g: d.item_feats[m, 1] for m, g in GENRES.items()}
    assert len(set(genre_code.values())) == 3
    by_user = {}
    for u, m, r, t in rows:
        by_user.setdefault(u - 1, []).append((t, m, r))
    for split in ("train", "test"):
        s = d.splits[split]
        for i in range(d.num_samples(split)):
            u = s["uid"][i]
            events = sorted(by_user[u])
            t, m = next((t, m) for t, m, r in events if m == s["target"][i])
            rating = next(r for tt, mm, r in events if mm == m)
            assert s["label"][i] == (rating >= 4)
            earlier_pos = [mm for tt, mm, r in events if (tt, mm) < (t, m) and r >= 4]
            assert np.array_equal(_history(d, split, i), earlier_pos[-3:])


def test_movielens_cache_is_reused(tmp_path, monkeypatch):
    _write_movielens(str(tmp_path), "1m", _ratings())
    d = load_dataset("movielens", str(tmp_path))
    calls = []
    original = SeqData.load
    monkeypatch.setattr(SeqData, "load", classmethod(lambda cls, p: calls.append(p) or original(p)))
    e = load_dataset("movielens", str(tmp_path))
    assert len(calls) == 1 and np.array_equal(e.splits["test"]["label"], d.splits["test"]["label"])
