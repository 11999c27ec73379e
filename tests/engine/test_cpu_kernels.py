"""The CPU decoding kernel: built into the cache, products equal to torch's within float rounding on every shape
remainder, a row's result independent of its batch, and a logged fallback where it cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch

from tasc_ray.engine.model.cpu_kernels import available_isas, build_kernels, load_kernels


@pytest.fixture(scope="module")
def gemm():
    kernel = load_kernels()
    if kernel is None:
        pytest.skip("no C compiler here")
    return kernel


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, 13, 26, 40])
@pytest.mark.parametrize(("n", "k"), [(1, 16), (7, 35), (130, 96), (576, 576), (1000, 24)])
def test_products_match_torch(gemm, m, n, k):
    random = torch.Generator().manual_seed(m * 1000 + n + k)
    x, w, b = (torch.randn(*shape, generator=random) for shape in ((m, k), (n, k), (n,)))
    torch.testing.assert_close(gemm(x, gemm.pack(w)), x @ w.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gemm(x, gemm.pack(w, b)), x @ w.T + b, atol=1e-4, rtol=1e-4)


def test_a_row_does_not_depend_on_the_other_rows(gemm):
    random = torch.Generator().manual_seed(0)
    x, w = torch.randn(30, 64, generator=random), torch.randn(200, 64, generator=random)
    packed = gemm.pack(w)
    together = gemm(x, packed)
    for rows in ([3], [0, 1], [5, 6, 7], [10, 11, 12, 13, 14, 15, 16, 17, 18]):
        assert torch.equal(gemm(x[rows], packed), together[rows])


def test_mismatched_shapes_are_refused(gemm):
    with pytest.raises(ValueError, match="does not fit"):
        gemm(torch.randn(2, 8), gemm.pack(torch.randn(4, 16)))


def test_no_compiler_falls_back_with_a_reason(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TASC_RAY_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level(logging.INFO, logger="tasc_ray.engine.model.cpu_kernels"):
        assert build_kernels() is None
    assert "CPU decoding kernels not used" in caplog.text
    monkeypatch.delenv("CC")
    monkeypatch.setenv("TASC_RAY_NO_CPU_KERNEL", "1")
    assert build_kernels() is None


def test_the_build_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("TASC_RAY_CACHE", str(tmp_path))
    if build_kernels() is None:
        pytest.skip("no C compiler here")
    built = list((tmp_path / "kernels").glob("*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    assert build_kernels() is not None and built[0].stat().st_mtime_ns == mtime


@pytest.fixture(scope="module")
def bf16_gemm(gemm):
    if "bf16" not in gemm.precisions:
        pytest.skip("this CPU has no AVX512-BF16")
    return gemm


@pytest.mark.parametrize("m", [1, 2, 3, 9, 16, 27, 64])
@pytest.mark.parametrize(("n", "k"), [(1, 16), (7, 35), (130, 96), (576, 577)])
def test_bf16_products_are_the_rounded_operands_products(bf16_gemm, m, n, k):
    """bf16: weights and inputs rounded to bfloat16 (as torch rounds), float32 sums; odd K padded."""
    random = torch.Generator().manual_seed(m * 1000 + n + k)
    x, w, b = (torch.randn(*shape, generator=random) for shape in ((m, k), (n, k), (n,)))
    want = x.bfloat16().float() @ w.bfloat16().float().T + b
    torch.testing.assert_close(bf16_gemm(x, bf16_gemm.pack(w, b, "bf16")), want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "w8a8"])
def test_a_reduced_precision_row_does_not_depend_on_the_other_rows(gemm, precision):
    """Batch invariance at M = 1, 2, 9, 16, 64 and for ragged subsets: a row's bits are the same in every call."""
    if precision not in gemm.precisions:
        pytest.skip(f"this CPU cannot run {precision} products")
    random = torch.Generator().manual_seed(1)
    x, w = torch.randn(64, 96, generator=random), torch.randn(300, 96, generator=random)
    packed = gemm.pack(w, None, precision)
    together = gemm(x, packed)
    for rows in ([3], [0, 1], list(range(9)), list(range(5, 21)), [2, 40, 41, 63], list(range(64))):
        assert torch.equal(gemm(x[rows], packed), together[rows])


@pytest.mark.parametrize(("m", "n", "k"), [(1, 37, 35), (9, 130, 96), (64, 576, 577)])
def test_int8_products_are_the_dequantised_weights_products(bf16_gemm, m, n, k):
    """int8: one scale per output (its largest weight maps to 127), the product that of bf16 inputs and the
    dequantised weights, which stay within half a quantisation step of the weights; a row's bits are the same
    in every call."""
    random = torch.Generator().manual_seed(m + n + k)
    x, w, b = (torch.randn(*shape, generator=random) for shape in ((m, k), (n, k), (n,)))
    packed = bf16_gemm.pack(w, b, "int8")
    assert packed.panels.dtype == torch.int8 and packed.scales is not None
    dequantised = bf16_gemm.dequantised(packed)
    step = w.abs().amax(1, keepdim=True) / 127
    assert bool(((dequantised - w).abs() <= step / 2 + 1e-6).all())
    got = bf16_gemm(x, packed)
    torch.testing.assert_close(got, x.bfloat16().float() @ dequantised.T + b, atol=2e-4, rtol=1e-4)
    assert torch.equal(bf16_gemm(x[-1:], packed), got[-1:])


@pytest.mark.parametrize(("m", "n", "k"), [(1, 37, 35), (3, 16, 16), (9, 130, 96), (27, 200, 66), (64, 576, 577)])
def test_w8a8_products_are_the_quantised_operands_products(gemm, m, n, k):
    """w8a8: int8 weights (one scale per output) times int8 inputs (one scale per row, its largest |x| -> 127),
    summed exactly: the product of the two quantised operands; K padded to whole quads."""
    if "w8a8" not in gemm.precisions:
        pytest.skip("this CPU has no AVX512-VNNI")
    from tasc_ray.engine.model.cpu_kernels import quantised_rows

    random = torch.Generator().manual_seed(7 * m + n + k)
    x, w, b = (torch.randn(*shape, generator=random) for shape in ((m, k), (n, k), (n,)))
    x[0] *= 50  # rows of very different ranges: each has its own scale
    packed = gemm.pack(w, b, "w8a8")
    assert packed.panels.dtype == torch.int8 and packed.sums is not None
    want = quantised_rows(x).double() @ gemm.dequantised(packed).double().T + b.double()
    torch.testing.assert_close(gemm(x, packed).double(), want, atol=1e-4, rtol=1e-5)
    zeros = torch.zeros(2, k)  # a row of zeros has no scale to take: its outputs are the bias
    torch.testing.assert_close(gemm(zeros, packed), b.expand(2, -1))


def test_an_unknown_precision_is_refused(gemm):
    with pytest.raises(ValueError, match="supported here"):
        gemm.pack(torch.randn(4, 16), None, "int3")


@pytest.mark.parametrize("isa", available_isas())
def test_every_instruction_set_path_builds_agrees_with_torch_and_is_batch_invariant(isa, monkeypatch, tmp_path):
    """Each ISA level other CPUs would take (AVX-512 here natively, AVX2, SSE2), forced on this machine: built,
    checked against torch (build_kernels refuses a disagreeing build), a row's products and attention independent
    of the other rows of the call."""
    monkeypatch.setenv("TASC_RAY_CACHE", str(tmp_path))
    kernels = build_kernels(isa)
    if kernels is None:
        pytest.skip("no C compiler here")
    assert ("bf16" in kernels.precisions) <= (isa in ("native", "avx512"))  # bf16 needs AVX512-BF16
    assert ("w8a8" in kernels.precisions) <= (isa in ("native", "avx512"))  # w8a8 needs AVX512-VNNI
    assert ("int8" in kernels.precisions) == ("bf16" in kernels.precisions)
    assert not kernels.amx or isa == "native"
    random = torch.Generator().manual_seed(1)
    x, w = torch.randn(64, 96, generator=random), torch.randn(130, 96, generator=random)
    for precision in kernels.precisions:
        packed = kernels.pack(w, None, precision)
        together = kernels(x, packed)
        for rows in ([0], [0, 1], list(range(9)), list(range(16))):  # M = 1, 2, 9, 16 against M = 64
            assert torch.equal(kernels(x[rows], packed), together[rows]), (precision, len(rows))
    q, keys, values = (
        torch.randn(*shape, generator=random) for shape in ((4, 3, 4, 32), (4, 2, 40, 32), (4, 2, 40, 32))
    )
    allowed = torch.rand(4, 3, 40, generator=random) > 0.2
    allowed[:, :, 0] = True
    together = kernels.attention(q, keys, values, allowed, 0.2)
    for r in range(4):  # a row alone, its query alone, and its slots shifted behind masked padding
        row = slice(r, r + 1)
        alone = kernels.attention(q[row], keys[row], values[row], allowed[row], 0.2)
        assert torch.equal(alone, together[row])
        one = kernels.attention(q[row, 1:2], keys[row], values[row], allowed[row, 1:2], 0.2)
        assert torch.equal(one, together[row, 1:2])
        padding = torch.zeros(1, 2, 7, 32)
        shifted_allowed = torch.cat([torch.zeros(1, 3, 7, dtype=torch.bool), allowed[row]], 2)
        shifted_keys, shifted_values = torch.cat([padding, keys[row]], 2), torch.cat([padding, values[row]], 2)
        shifted = kernels.attention(q[row], shifted_keys, shifted_values, shifted_allowed, 0.2)
        assert torch.equal(shifted, together[row])
    # Padding queries (nothing allowed) get zeros and leave the real queries of their blocks bit-identical.
    padded = allowed.clone()
    padded[0, 1], padded[2, :2], padded[3] = False, False, False
    out = kernels.attention(q, keys, values, padded, 0.2)
    dead = ~padded.any(-1)
    assert not out[dead].any() and torch.equal(out[~dead], together[~dead])
    # A prefix shared by every row, stored once (21 slots: not whole vectors), equals the prefix copied into each
    # row; a row that does not see the prefix equals that row over its own slots alone.
    shared_k, shared_v = keys[:1, :, :21], values[:1, :, :21]
    copied_k = torch.cat([shared_k.expand(4, -1, -1, -1), keys[:, :, 21:]], 2)
    copied_v = torch.cat([shared_v.expand(4, -1, -1, -1), values[:, :, 21:]], 2)
    own_k, own_v = keys[:, :, 21:], values[:, :, 21:]
    shared = kernels.attention(q, own_k, own_v, allowed, 0.2, prefix=(shared_k, shared_v))
    assert torch.equal(shared, kernels.attention(q, copied_k, copied_v, allowed, 0.2))
    blind = allowed.clone()
    blind[:, :, :21] = False
    blind[:, :, 21] = True
    alone = kernels.attention(q, own_k, own_v, blind[:, :, 21:], 0.2)
    assert torch.equal(kernels.attention(q, own_k, own_v, blind, 0.2, prefix=(shared_k, shared_v)), alone)


def test_an_isa_this_machine_cannot_run_is_refused(monkeypatch):
    monkeypatch.setenv("TASC_RAY_CPU_ISA", "vax")
    with pytest.raises(ValueError, match="ISA 'vax' cannot run here; available: native"):
        build_kernels()
