"""The whole DIN model: an inference batch (forward) and a training step (full), against DeepCTR-Torch's DIN."""

import pytest

from benchmarks.cases import MODES, PROVIDERS, shape_label
from benchmarks.conftest import shapes


@pytest.mark.parametrize("mode", MODES["din_step"])
@pytest.mark.parametrize("shape", shapes("din_step"), ids=lambda s: shape_label("din_step", s).replace(" ", "-"))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_din_step(run_case, provider, shape, mode):
    run_case("din_step", provider, shape, mode)
