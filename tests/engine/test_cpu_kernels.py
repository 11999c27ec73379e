"""The CPU decoding kernel: built into the cache, products equal to torch's within float rounding on every shape
remainder, a row's result independent of its batch, and a logged fallback where it cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch

from tasc_ray.engine.model.cpu_kernels import build_kernels, load_kernels


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


def test_a_bf16_row_does_not_depend_on_the_other_rows(bf16_gemm):
    """Batch invariance at M = 1, 2, 9, 16, 64 and for ragged subsets: a row's bits are the same in every call."""
    random = torch.Generator().manual_seed(1)
    x, w = torch.randn(64, 96, generator=random), torch.randn(300, 96, generator=random)
    packed = bf16_gemm.pack(w, None, "bf16")
    together = bf16_gemm(x, packed)
    for rows in ([3], [0, 1], list(range(9)), list(range(5, 21)), [2, 40, 41, 63], list(range(64))):
        assert torch.equal(bf16_gemm(x[rows], packed), together[rows])


def test_an_unknown_precision_is_refused(gemm):
    with pytest.raises(ValueError, match="supported here"):
        gemm.pack(torch.randn(4, 16), None, "int3")
