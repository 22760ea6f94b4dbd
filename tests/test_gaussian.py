"""The Gaussian and Mahalanobis steps against an independent float64 NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastpadim.errors import FastpadimError
from fastpadim.gaussian import GaussianStats, mahalanobis

EPS = 0.01


def reference(train: np.ndarray, eps: float):
    """Per position: mean, Σ = np.cov(ddof=1) + εI and its inverse, all float64."""
    n, positions, dim = train.shape
    means = train.mean(axis=0)
    covs = np.stack([np.cov(train[:, p, :], rowvar=False, ddof=1).reshape(dim, dim) + eps * np.eye(dim)
                     for p in range(positions)])
    return means, covs


def reference_distances(points: np.ndarray, means: np.ndarray, covs: np.ndarray) -> np.ndarray:
    """sqrt((x − μ)ᵀ Σ⁻¹ (x − μ)) with np.linalg.solve, (B, P)."""
    out = np.empty(points.shape[:2])
    for p in range(points.shape[1]):
        centred = points[:, p, :] - means[p]
        out[:, p] = np.sqrt(np.einsum("bd,bd->b", centred, np.linalg.solve(covs[p], centred.T).T))
    return out


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def embeddings(n, positions, dim, offset=0.0, seed=0):
    """Correlated random embeddings (a random mixing matrix per position) around a common offset."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(positions, dim, dim)) / np.sqrt(dim)
    latent = rng.normal(size=(n, positions, dim)) * rng.uniform(0.2, 3.0, size=dim)
    return np.einsum("npd,pde->npe", latent, mixing) + offset + rng.normal(size=(positions, dim))


def stats_in_batches(x: np.ndarray, batch: int, dtype=torch.float64) -> GaussianStats:
    t = torch.from_numpy(x).to(dtype)
    stats = GaussianStats.empty(x.shape[1], x.shape[2])
    for start in range(0, len(x), batch):
        stats.update(t[start:start + batch])
    return stats


CASES = {
    "N>>d": (200, 6, 8, 0.0),
    "d close to N": (30, 4, 28, 0.0),  # Σ nearly singular: ε decides the result
    "d = N": (24, 3, 24, 0.0),  # sample covariance of rank N-1 < d: only εI makes it invertible
    "d > N": (12, 3, 20, 0.0),
    "large offset": (60, 4, 10, 1e4),
    "huge offset": (60, 4, 10, 1e7),  # naive float64 sums of squares lose everything here
}


@pytest.mark.parametrize("n,positions,dim,offset", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_statistics_and_distances_match_numpy(n, positions, dim, offset, batch):
    train = embeddings(n, positions, dim, offset)
    points = embeddings(9, positions, dim, offset, seed=1)
    means, covs = reference(train, EPS)
    stats = stats_in_batches(train, batch)
    assert stats.count == n
    assert relative_error(stats.mean, means) < 1e-12 * max(1.0, abs(offset))
    # Means relative to their spread, not to the offset, so the offset cases test the centring.
    np.testing.assert_allclose(stats.mean.numpy() - offset, means - offset, rtol=0, atol=1e-5 * train.std())
    assert relative_error(stats.covariance(EPS), covs) < 1e-5

    whitener = stats.whitener(EPS, torch.float64).numpy()
    # W is L⁻¹ with Σ = L Lᵀ: W Σ Wᵀ = I, Wᵀ W = Σ⁻¹, and W is lower triangular.
    eye = np.broadcast_to(np.eye(dim), covs.shape)
    assert relative_error(whitener @ covs @ whitener.transpose(0, 2, 1), eye) < 1e-5
    assert relative_error(whitener.transpose(0, 2, 1) @ whitener, np.linalg.inv(covs)) < 1e-5
    assert np.all(np.triu(whitener, k=1) == 0)

    distances = mahalanobis(torch.from_numpy(points), stats.mean, torch.from_numpy(whitener)).numpy()
    expected = reference_distances(points, means, covs)
    assert distances.shape == (9, positions)
    np.testing.assert_allclose(distances, expected, rtol=1e-5)
    assert np.all(distances >= 0)


def test_epsilon_matters_when_d_close_to_n():
    """With d ≥ N the sample covariance is singular: the result must follow ε, not be an artefact of it."""
    train = embeddings(10, 2, 12)
    stats = stats_in_batches(train, 3)
    points = embeddings(5, 2, 12, seed=3)
    for eps in (1e-3, 1e-2, 1.0):
        means, covs = reference(train, eps)
        d = mahalanobis(torch.from_numpy(points), stats.mean, stats.whitener(eps, torch.float64)).numpy()
        np.testing.assert_allclose(d, reference_distances(points, means, covs), rtol=1e-5)
    small = mahalanobis(torch.from_numpy(points), stats.mean, stats.whitener(1e-3, torch.float64))
    large = mahalanobis(torch.from_numpy(points), stats.mean, stats.whitener(1.0, torch.float64))
    assert torch.all(small > large)


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_float32_embeddings_accumulate_soundly(offset):
    """The model feeds float32 network features: the statistics must still agree to 1e-5 with float64 on the
    same (float32-rounded) values, also with a large common offset where float32 sums of squares would fail."""
    train = embeddings(120, 4, 16, offset).astype(np.float32)
    means, covs = reference(train.astype(np.float64), EPS)
    stats = stats_in_batches(train, 32, dtype=torch.float32)
    assert relative_error(stats.covariance(EPS), covs) < 1e-5
    # Batch means are taken in float32 (as the model's float32 mean_ is stored): relative to their magnitude.
    assert relative_error(stats.mean, means) < 1e-6


def test_float32_factor_used_by_the_model_agrees():
    """The stored float32 whitener (the model's default) and float32 features still give 1e-5 distances."""
    train = embeddings(100, 4, 24).astype(np.float32)
    points = embeddings(8, 4, 24, seed=5).astype(np.float32)
    stats = stats_in_batches(train, 16, dtype=torch.float32)
    means, covs = reference(train.astype(np.float64), EPS)
    d = mahalanobis(torch.from_numpy(points), stats.mean.float(), stats.whitener(EPS, torch.float32)).numpy()
    np.testing.assert_allclose(d, reference_distances(points.astype(np.float64), means, covs), rtol=1e-5)


def test_merge_equals_one_shot_and_leaves_inputs_untouched():
    x = embeddings(50, 3, 6, offset=100.0)
    whole = stats_in_batches(x, 1000)
    a, b = stats_in_batches(x[:13], 5), stats_in_batches(x[13:], 4)
    a_mean, a_scatter = a.mean.clone(), a.scatter.clone()
    merged = a.merge(b)
    assert merged.count == 50
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.scatter, whole.scatter, rtol=1e-10, atol=1e-9)
    assert torch.equal(a.mean, a_mean) and torch.equal(a.scatter, a_scatter) and a.count == 13
    # Merging with empty statistics, either way round, changes nothing.
    empty = GaussianStats.empty(3, 6)
    for m in (merged.merge(empty), empty.merge(merged)):
        assert m.count == 50
        torch.testing.assert_close(m.mean, merged.mean)
        torch.testing.assert_close(m.scatter, merged.scatter)


def test_distance_at_the_mean_is_zero_and_never_negative():
    stats = stats_in_batches(embeddings(20, 5, 8), 20)
    whitener = stats.whitener(EPS)
    at_mean = mahalanobis(stats.mean.float().unsqueeze(0), stats.mean, whitener)
    assert torch.all(at_mean >= 0) and float(at_mean.max()) < 1e-3
    far = mahalanobis(torch.from_numpy(embeddings(50, 5, 8, offset=1e3, seed=9)), stats.mean, whitener)
    assert torch.all(far >= 0) and torch.isfinite(far).all()


def test_fewer_than_two_samples_is_a_clear_error():
    stats = stats_in_batches(embeddings(1, 2, 3), 1)
    with pytest.raises(FastpadimError, match="at least 2"):
        stats.covariance(EPS)
    with pytest.raises(FastpadimError, match="at least 2"):
        stats.whitener(EPS)


def test_shape_mismatch_is_a_clear_error():
    stats = GaussianStats.empty(4, 3)
    with pytest.raises(FastpadimError, match="does not match"):
        stats.update(torch.zeros(2, 4, 5, dtype=torch.float64))
    with pytest.raises(FastpadimError, match="cannot merge"):
        stats.merge(GaussianStats.empty(4, 5))


def test_chunked_positions_match(monkeypatch):
    """Updates and factors are computed in chunks of positions; a tiny chunk size must not change anything."""
    import fastpadim.gaussian as gaussian

    x = embeddings(20, 7, 5, offset=10.0)
    whole = stats_in_batches(x, 6)
    monkeypatch.setattr(gaussian, "_CHUNK_ELEMENTS", 2 * 25)  # 2 positions per chunk
    chunked = stats_in_batches(x, 6)
    torch.testing.assert_close(chunked.scatter, whole.scatter, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(chunked.whitener(EPS, torch.float64), whole.whitener(EPS, torch.float64))


@pytest.mark.parametrize("dim", [5, 33, 64, 177])
def test_triangular_inverse_by_halves_equals_the_triangular_solve(dim):
    from fastpadim.gaussian import triangular_inverse

    generator = torch.Generator().manual_seed(dim)
    samples = torch.randn(3, 2 * dim, dim, dtype=torch.float64, generator=generator)
    lower = torch.linalg.cholesky(samples.transpose(1, 2) @ samples / (2 * dim) + 0.01 * torch.eye(dim, dtype=torch.float64))
    expected = torch.linalg.solve_triangular(lower, torch.eye(dim, dtype=torch.float64).expand_as(lower), upper=False)
    got = triangular_inverse(lower)
    assert torch.equal(got.triu(1), torch.zeros_like(got))  # lower triangular, exactly
    assert (got - expected).abs().max() <= 1e-12 * expected.abs().max()
    assert torch.allclose(got @ lower, torch.eye(dim, dtype=torch.float64).expand_as(lower), atol=1e-10)


def numpy_stats_in_batches(x: np.ndarray, batch: int, dtype=np.float64) -> GaussianStats:
    stats = GaussianStats.empty(x.shape[1], x.shape[2], like=np.empty(0))
    for start in range(0, len(x), batch):
        stats.update(x[start:start + batch].astype(dtype))
    return stats


@pytest.mark.parametrize("n,positions,dim,offset", CASES.values(), ids=CASES.keys())
def test_numpy_statistics_are_the_torch_statistics(n, positions, dim, offset):
    """The same code on NumPy arrays (a fit through an ONNX engine, torch never imported) gives what it gives on
    torch tensors: statistics, merges, a fold taken out, the factor, distances and leave-one-out distances."""
    train = embeddings(n, positions, dim, offset)
    points = embeddings(9, positions, dim, offset, seed=1)
    means, covs = reference(train, EPS)
    got, expected = numpy_stats_in_batches(train, 7), stats_in_batches(train, 7)
    assert isinstance(got.mean, np.ndarray) and isinstance(got.scatter, np.ndarray) and got.count == n
    np.testing.assert_allclose(got.mean, expected.mean.numpy(), rtol=1e-13, atol=0)
    assert relative_error(got.scatter, expected.scatter.numpy()) < 1e-8  # another BLAS: other rounding
    assert relative_error(got.covariance(EPS), covs) < 1e-5
    half = n // 2
    merged = numpy_stats_in_batches(train[:half], 5).merge(numpy_stats_in_batches(train[half:], 3))
    assert relative_error(merged.scatter, expected.scatter.numpy()) < 1e-8
    rest = got.merge(GaussianStats.empty(positions, dim, like=np.empty(0))).without(
        numpy_stats_in_batches(train[half:], 4))
    assert rest.count == half
    assert relative_error(rest.scatter, numpy_stats_in_batches(train[:half], 4).scatter) < 1e-8
    whitener = got.whitener(EPS, np.float64)
    assert whitener.dtype == np.float64 and np.all(np.triu(whitener, k=1) == 0)
    np.testing.assert_allclose(whitener, expected.whitener(EPS, torch.float64).numpy(), rtol=0,
                               atol=1e-6 * np.abs(whitener).max())  # the huge offset: scatters agree to 1e-10
    distances = mahalanobis(points, got.mean, whitener)
    assert isinstance(distances, np.ndarray) and distances.dtype == np.float32  # as the model's, whatever the input
    np.testing.assert_allclose(distances, reference_distances(points, means, covs), rtol=1e-5)
    from fastpadim.gaussian import leave_one_out

    if n >= 3:
        np.testing.assert_allclose(leave_one_out(distances, n),
                                   leave_one_out(torch.from_numpy(distances), n).numpy(), rtol=1e-6)


def test_numpy_factor_consumes_the_statistics_in_place():
    train = embeddings(40, 70, 12, offset=5.0)
    stats = numpy_stats_in_batches(train, 16, np.float32)
    expected = stats.whitener(EPS)
    memory = stats.scatter
    got = stats.whitener(EPS, consume=True)
    assert np.shares_memory(got, memory) and stats.count == -1 and stats.scatter.size == 0
    np.testing.assert_array_equal(got, expected)


def test_the_statistics_module_loads_without_torch():
    import subprocess
    import sys

    code = ("import sys, numpy as np; from fastpadim.gaussian import GaussianStats; "
            "s = GaussianStats.empty(3, 4, like=np.empty(0)); s.update(np.random.rand(5, 3, 4).astype('f4')); "
            "s.whitener(0.01); assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
