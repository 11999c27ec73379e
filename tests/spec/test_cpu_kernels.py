"""The CPU decoding kernel: built into the cache, products equal to torch's within float rounding on every shape
remainder, and a logged fallback where it cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch

from tasc_ray.spec.cpu_kernels import build_gemv, load_gemv


@pytest.fixture(scope="module")
def gemv():
    kernel = load_gemv()
    if kernel is None:
        pytest.skip("no C compiler here")
    return kernel


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, 16])
@pytest.mark.parametrize(("n", "k"), [(1, 16), (7, 35), (130, 96), (576, 576)])
def test_products_match_torch(gemv, m, n, k):
    random = torch.Generator().manual_seed(m * 1000 + n + k)
    x, w, b = (torch.randn(*shape, generator=random) for shape in ((m, k), (n, k), (n,)))
    torch.testing.assert_close(gemv(x, w), x @ w.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gemv(x, w, b), x @ w.T + b, atol=1e-4, rtol=1e-4)


def test_a_row_does_not_depend_on_the_other_rows(gemv):
    random = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 64, generator=random), torch.randn(33, 64, generator=random)
    together = gemv(x, w)
    assert all(torch.equal(gemv(x[i : i + 1], w)[0], together[i]) for i in range(7))


def test_mismatched_shapes_are_refused(gemv):
    with pytest.raises(ValueError, match="does not fit"):
        gemv(torch.randn(2, 8), torch.randn(4, 16))


def test_no_compiler_falls_back_with_a_reason(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TASC_RAY_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level(logging.INFO, logger="tasc_ray.spec.cpu_kernels"):
        assert build_gemv() is None
    assert "CPU decoding kernel not used" in caplog.text
    monkeypatch.delenv("CC")
    monkeypatch.setenv("TASC_RAY_NO_CPU_KERNEL", "1")
    assert build_gemv() is None


def test_the_build_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("TASC_RAY_CACHE", str(tmp_path))
    if build_gemv() is None:
        pytest.skip("no C compiler here")
    built = list((tmp_path / "kernels").glob("*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    assert build_gemv() is not None and built[0].stat().st_mtime_ns == mtime
