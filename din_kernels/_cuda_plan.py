"""The shared-memory plan of the CUDA attention kernels (``plan()`` and ``configure()`` in csrc/cuda/attention.cu),
mirrored in Python: which sizes the ``cuda`` backend covers, and the launch each kernel takes. Imports nothing (the
compile report, benchmarks/compile_check_cuda.py, loads it by path).
"""

from __future__ import annotations

CUDA_SMEM_PER_BLOCK = 232448  # bytes of shared memory a block may use on sm_90 (H100/H200)

# the launches that csrc/cuda/attention.cu's configure() tries, in order: (rows a tile, partial sums in shared memory)
CUDA_LAUNCHES = {"fwd": ((64, False), (32, False), (16, False)), "stats": ((64, False), (32, False), (16, False)),
                 "bwd": ((64, True), (32, True), (16, True), (32, False), (16, False))}


def _r16(n: int) -> int:
    return (n + 15) // 16 * 16


def cuda_attention_partial_floats(D: int, widths) -> int:
    """Floats of one block's partial sums in the CUDA backward (``Call::part_layout`` in csrc/cuda/attention.cu)."""
    off = 0

    def take(n):
        nonlocal off
        off = (off + 7) // 8 * 8 + n

    Hp = [_r16(h) for h in widths]
    take(Hp[0] * (_r16(D) + 4))
    take(Hp[0] * (_r16(D) + 4))
    for i in range(1, len(widths)):
        take(Hp[i] * (Hp[i - 1] + 4))
    for h in list(widths[1:]) + [widths[-1], 1] + [sum(widths)] * 3:
        take(h)
    return (off + 7) // 8 * 8


def cuda_attention_smem(D: int, widths, float32: bool, kind: str, rows: int = 16, partials: bool = False) -> int:
    """Bytes of shared memory of one block of a CUDA attention kernel (``kind`` fwd, stats or bwd) with tiles of
    ``rows`` behaviours (and, for bwd, the partial sums in shared memory): ``plan()`` in csrc/cuda/attention.cu,
    mirrored."""
    E = 4 if float32 else 2
    op_ld = (lambda n: n + 1) if float32 else (lambda n: n + 8)
    acc_ld = lambda n: n + 4  # noqa: E731
    Dp, Hp = _r16(D), [_r16(h) for h in widths]
    H1p, Hmax, bt = Hp[0], max(Hp), rows
    sizes = [H1p * op_ld(Dp) * E, bt * op_ld(Dp) * E]
    if kind == "bwd":
        sizes += [bt * op_ld(Dp) * E] + [bt * acc_ld(h) * 4 for h in Hp]
        sizes += [bt * op_ld(h) * E for h in Hp[:-1]]
        sizes += [bt * acc_ld(Hmax) * 4, bt * op_ld(Hmax) * E, bt * acc_ld(Dp) * 4]
    else:
        sizes += [bt * acc_ld(Hmax) * 4] + ([bt * op_ld(Hmax) * E] if len(Hp) > 1 else [])
    sizes += [3 * bt * 4, (2 * H1p + 3 * Dp) * 4, 64 * 4]
    sizes += [2 * Hmax * 4] if kind == "stats" else []
    sizes += [cuda_attention_partial_floats(D, widths) * 4] if kind == "bwd" and partials else []
    return sum((n + 127) // 128 * 128 for n in sizes)


def cuda_attention_launch(D: int, widths, float32: bool, kind: str,
                          limit: int = CUDA_SMEM_PER_BLOCK) -> tuple[int, bool, int] | None:
    """``(rows a tile, partial sums in shared memory, bytes)`` of the launch the CUDA kernel of ``kind`` takes on a
    GPU with ``limit`` bytes of shared memory per block, or None when none fits."""
    for rows, partials in CUDA_LAUNCHES[kind]:
        need = cuda_attention_smem(D, widths, float32, kind, rows, partials)
        if need <= limit:
            return rows, partials, need
    return None
