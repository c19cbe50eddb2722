"""Target attention: every provider, forward / backward / full, at the suite's shapes; and the headline case."""

import pytest

from benchmarks.cases import HEADLINE, MODES, PROVIDERS, shape_label
from benchmarks.conftest import shapes


@pytest.mark.parametrize("mode", MODES["attention"])
@pytest.mark.parametrize("shape", shapes("attention"), ids=lambda s: shape_label("attention", s).replace(" ", "-"))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_attention(run_case, provider, shape, mode):
    run_case("attention", provider, shape, mode)


@pytest.mark.parametrize("provider", HEADLINE["providers"])
def test_attention_headline(run_case, provider):
    """Forward+backward of TargetAttention(128, (80, 40), "sigmoid") at B=1024, T=100: torch vs DeepCTR-Torch."""
    run_case("attention", provider, dict(HEADLINE["shape"]), HEADLINE["mode"])
