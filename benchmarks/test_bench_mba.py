"""Mini-batch aware L2: every provider at the suite's shapes, and the cost against the table size K."""

import pytest

from benchmarks.cases import PROVIDERS, shape_label
from benchmarks.conftest import shapes


@pytest.mark.parametrize("shape", shapes("mba"), ids=lambda s: shape_label("mba", s).replace(" ", "-"))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_mba(run_case, provider, shape):
    run_case("mba", provider, shape, "forward")


@pytest.mark.parametrize("K", [100_000, 10_000_000])
def test_mba_independent_of_k(run_case, K):
    """The same batch (B=1024, 101 ids each, all below 1e5) against a table of 1e5 and of 1e7 rows: the torch path
    should take the same time (it reads and writes only the batch's rows)."""
    run_case("mba", "torch", {"K": K, "B": 1024, "L": 101, "D": 16, "ids": 100_000}, "forward")
