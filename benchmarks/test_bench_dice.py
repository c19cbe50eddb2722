"""Dice in training (batch statistics): every provider, forward / backward / full."""

import pytest

from benchmarks.cases import MODES, PROVIDERS, shape_label
from benchmarks.conftest import shapes


@pytest.mark.parametrize("mode", MODES["dice"])
@pytest.mark.parametrize("shape", shapes("dice"), ids=lambda s: shape_label("dice", s).replace(" ", "-"))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_dice(run_case, provider, shape, mode):
    run_case("dice", provider, shape, mode)
