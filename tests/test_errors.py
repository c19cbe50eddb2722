"""Bad input (SPEC section 5): each case asserts the exception type and that the message names the argument."""

import pytest
import torch

import din_kernels as dk


def _params(D=3, hidden=(4,)):
    widths = (4 * D, *hidden, 1)
    W = [torch.randn(o, i) for i, o in zip(widths[:-1], widths[1:])]
    b = [torch.randn(o) for o in widths[1:]]
    return W, b


def _call(**over):
    W, b = _params()
    kw = dict(query=torch.randn(2, 3), keys=torch.randn(2, 4, 3), weights=W, biases=b, lengths=torch.tensor([1, 4]))
    kw.update(over)
    backend = kw.pop("backend", "torch")
    return dk.target_attention(**kw, backend=backend)


@pytest.mark.parametrize("over,exc,pattern", [
    ({"query": torch.randn(2, 1, 3)}, ValueError, r"query.*\(2, 1, 3\)"),
    ({"keys": torch.randn(2, 3)}, ValueError, r"keys.*\[B, T, D\]"),
    ({"keys": torch.randn(3, 4, 3)}, ValueError, r"keys has batch size 3 .* query has 2"),
    ({"keys": torch.randn(2, 4, 5)}, ValueError, r"keys.*D = 5.*D = 3"),
    ({"lengths": torch.tensor([1, 2, 3])}, ValueError, r"lengths has 3 entries.*2"),
    ({"lengths": torch.tensor([1, 5])}, ValueError, r"lengths.*\[0, 4\].*\[1, 5\]"),
    ({"lengths": torch.tensor([-1, 2])}, ValueError, r"lengths.*\[-1, 2\]"),
    ({"lengths": torch.tensor([1.0, 2.0])}, TypeError, r"lengths.*int32 or int64.*float32"),
    ({"query": torch.randn(2, 3, dtype=torch.float64).to(torch.int64)}, TypeError, r"query.*int64"),
    ({"lengths": None, "keys": torch.randn(2, 3)}, ValueError, r"exactly one of lengths.*offsets"),
    ({"offsets": torch.tensor([0, 1, 4])}, ValueError, r"exactly one of lengths.*offsets"),
    ({"normalization": "sparsemax"}, ValueError, r"normalization.*sparsemax"),
    ({"activation": "gelu"}, ValueError, r"activation.*gelu"),
    ({"weights": _params(D=2)[0]}, ValueError, r"weights\[0\].*\[H, 12\].*\(4, 8\)"),
    ({"biases": [torch.randn(5), torch.randn(1)]}, ValueError, r"biases\[0\].*\[4\].*\(5,\)"),
    ({"backend": "nope"}, ValueError, r"backend.*'nope'"),
])
def test_attention_bad_input(over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _call(**over)


def test_padded_keys_without_lengths_are_all_valid():
    W, b = _params()
    q, k = torch.randn(2, 3), torch.randn(2, 4, 3)
    torch.testing.assert_close(dk.target_attention(q, k, W, b, backend="torch"),
                               dk.target_attention(q, k, W, b, torch.tensor([4, 4]), backend="torch"))


@pytest.mark.parametrize("offsets,pattern", [
    (torch.tensor([1, 2, 5]), r"offsets\[0\] must be 0, got 1"),
    (torch.tensor([0, 2, 4]), r"offsets\[-1\] must equal the number of keys N = 5, got 4"),
    (torch.tensor([0, 5]), r"offsets has 2 entries but must have B \+ 1 = 3"),
])
def test_bad_offsets(offsets, pattern):
    W, b = _params()
    with pytest.raises(ValueError, match=pattern):
        dk.target_attention(torch.randn(2, 3), torch.randn(5, 3), W, b, offsets=offsets, backend="torch")


def test_non_monotonic_offsets_are_named():
    W, b = _params()
    with pytest.raises(ValueError, match=r"non-decreasing, got offsets\[1\] = 4 > offsets\[2\] = 3"):
        dk.target_attention(torch.randn(3, 3), torch.randn(5, 3), W, b, offsets=torch.tensor([0, 4, 3, 5]),
                            backend="torch")


def test_mixed_devices_are_named():
    W, b = _params()
    with pytest.raises(ValueError, match=r"keys is on meta but query is on cpu"):
        dk.target_attention(torch.randn(2, 3), torch.randn(2, 4, 3, device="meta"), W, b,
                            lengths=torch.tensor([1, 2]), backend="torch")


def test_act_weights_count_is_named():
    W, b = _params()
    with pytest.raises(ValueError, match=r"activation 'prelu' needs 1 act_weights.*got 0"):
        dk.target_attention(torch.randn(2, 3), torch.randn(2, 4, 3), W, b, lengths=torch.tensor([1, 2]),
                            activation="prelu", backend="torch")
