"""MovieLens in the GroupLens formats (ml-100k ``u.data``/``u.item``; ml-1m ``ratings.dat``/``movies.dat``; ml-20m
and later ``ratings.csv``/``movies.csv``), the paper's protocol (section 6.1).

Every rating is an impression; a rating >= 4 is a click. A movie's category is its first listed genre. The
behaviours of a sample are the user's positively rated movies strictly before it in time order (ties broken by
movie id), the most recent ``max_len`` of them. Users are split by user into train (``train_frac``, the paper's
~72%) and test; ``val_frac`` of the training users are held out as validation (disjoint users, like test).
"""

from __future__ import annotations

import os

import numpy as np

from .._extras import require
from ..nn.din import FeatureSchema, Field
from .core import SeqData, cache_path, make_split, sequences_from_frame

pd = require("pandas", "train")

ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western")


def _read(data_dir: str) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """``(ratings [user, movie, rating, ts], movies [movie, genre], source paths)`` from whichever format is there."""
    p = lambda name: os.path.join(data_dir, name)
    rating_cols = ["user", "movie", "rating", "ts"]
    if os.path.exists(p("u.data")):
        ratings = pd.read_csv(p("u.data"), sep="\t", names=rating_cols, engine="c")
        items = pd.read_csv(p("u.item"), sep="|", header=None, encoding="latin-1")
        flags = items.iloc[:, 5:5 + len(ML100K_GENRES)].to_numpy()
        first = np.where(flags.any(1), flags.argmax(1), 0)
        movies = pd.DataFrame({"movie": items[0], "genre": [ML100K_GENRES[g] for g in first]})
        return ratings, movies, [p("u.data"), p("u.item")]
    if os.path.exists(p("ratings.dat")):
        ratings = pd.read_csv(p("ratings.dat"), sep="::", names=rating_cols, engine="python")
        movies = pd.read_csv(p("movies.dat"), sep="::", names=["movie", "title", "genres"], engine="python",
                             encoding="latin-1")
        paths = [p("ratings.dat"), p("movies.dat")]
    elif os.path.exists(p("ratings.csv")):
        ratings = pd.read_csv(p("ratings.csv")).set_axis(rating_cols, axis=1)
        movies = pd.read_csv(p("movies.csv")).set_axis(["movie", "title", "genres"], axis=1)
        paths = [p("ratings.csv"), p("movies.csv")]
    else:
        raise FileNotFoundError(f"no MovieLens files in {data_dir!r}: expected u.data + u.item (ml-100k), "
                                "ratings.dat + movies.dat (ml-1m) or ratings.csv + movies.csv (ml-20m)")
    movies = pd.DataFrame({"movie": movies["movie"], "genre": movies["genres"].astype(str).str.split("|").str[0]})
    return ratings, movies, paths


def load_movielens(data_dir: str, max_len: int = 50, train_frac: float = 0.72, val_frac: float = 0.1, seed: int = 0,
                   cache: bool = True, embed_dim: int = 8) -> SeqData:
    """The dataset described in the module docstring, cached under ``data_dir/.din_cache``."""
    ratings, movies, paths = _read(data_dir)
    params = {"max_len": max_len, "train_frac": train_frac, "val_frac": val_frac, "seed": seed,
              "embed_dim": embed_dim}
    path = cache_path(os.path.join(data_dir, ".din_cache"), "movielens", paths, params)
    if cache and os.path.exists(path):
        return SeqData.load(path)
    movie_codes, movie_index = pd.factorize(ratings["movie"], sort=True)
    user_codes, _ = pd.factorize(ratings["user"], sort=True)
    genre_of = dict(zip(movies["movie"], movies["genre"]))
    genre_codes, genre_index = pd.factorize(pd.Series([genre_of.get(m, "unknown") for m in movie_index]), sort=True)
    n_items, n_users = len(movie_index), int(user_codes.max()) + 1 if len(user_codes) else 0
    item_feats = np.zeros((n_items + 1, 2), dtype=np.int64)
    item_feats[1:, 0] = np.arange(1, n_items + 1)
    item_feats[1:, 1] = genre_codes + 1

    frame = pd.DataFrame({"u": user_codes, "i": movie_codes + 1, "t": ratings["ts"].to_numpy(),
                          "click": (ratings["rating"].to_numpy() >= 4)})
    frame = frame.sort_values(["u", "t", "i"], kind="stable").reset_index(drop=True)
    click = frame["click"].to_numpy()
    pos_rows = frame[click]
    seq_values, seq_offsets = sequences_from_frame(pos_rows["u"].to_numpy(), pos_rows["i"].to_numpy(), n_users)
    # positives before each row of its user = the user's cumulative click count, exclusive
    u = frame["u"].to_numpy()
    before = np.cumsum(click) - click
    first_of_user = np.concatenate([[0], np.cumsum(np.bincount(u, minlength=n_users))[:-1]]).astype(np.int64)
    pos = before - before[first_of_user[u]]

    rng = np.random.default_rng(seed)
    order = rng.permutation(n_users)
    n_train = int(round(train_frac * n_users))
    n_val = int(round(val_frac * n_train))
    split_of = np.full(n_users, 2)
    split_of[order[:n_train - n_val]], split_of[order[n_train - n_val:n_train]] = 0, 1
    splits = {}
    for k, name in enumerate(("train", "val", "test")):
        sel = split_of[u] == k
        splits[name] = make_split(u[sel], pos[sel], frame["i"].to_numpy()[sel], click[sel])
    schema = FeatureSchema(item_fields=(Field("goods_id", n_items + 1, embed_dim),
                                        Field("cate_id", len(genre_index) + 1, embed_dim)))
    data = SeqData(schema, max_len, item_feats, seq_values, seq_offsets, np.zeros((n_users, 0), dtype=np.int64), {},
                   splits, {"dataset": "movielens", "users": n_users, "items": n_items, "genres": len(genre_index)})
    if cache:
        data.save(path)
    return data
