"""Mergeable statistics, and fitting/scoring on a local Ray: the same model as one process, faults included."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastpadim import Padim
from fastpadim.cli.app import expand_bare_ray
from fastpadim.cli.fit import fit_items
from fastpadim.distributed import FAULT_MARKER_ENV, predict_on_ray, scored_names, shard_bounds
from fastpadim.gaussian import GaussianStats, unpack
from fastpadim.modelfile import read_model_file
from fastpadim.sources import Item
from conftest import bottle_root  # noqa: E402

BOTTLE = bottle_root() or Path("absent-bottle-data")  # conftest: beside the checkout, $FASTPADIM_BOTTLE, /work/shared

MEAN_RTOL, COV_RTOL = 1e-6, 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative difference in norm (elementwise ratios are meaningless for entries near zero)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm().clamp_min(1e-300))


def covariance(stats: GaussianStats) -> torch.Tensor:
    return unpack(stats.scatter, stats.dim) / (stats.count - 1)


# ------------------------------------------------------------------------------------ merge (no Ray)
@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_merging_parts_in_any_order_equals_the_one_shot_statistics(parts):
    rng = np.random.default_rng(parts)
    # A large common offset makes a naive sum-of-squares merge lose digits; the centred merge must not.
    x = torch.from_numpy(rng.normal(size=(13, 6, 5)) * rng.uniform(0.1, 3, size=5) + 100.0)
    whole = GaussianStats.from_embeddings(x.clone())
    reference_mean = x.mean(dim=0)
    reference_cov = torch.stack([torch.from_numpy(np.cov(x[:, p].numpy(), rowvar=False)) for p in range(6)])
    assert rel(whole.mean, reference_mean) < MEAN_RTOL
    assert rel(covariance(whole), reference_cov) < COV_RTOL

    cuts = sorted(rng.choice(np.arange(1, 13), size=parts - 1, replace=False).tolist()) if parts > 1 else []
    pieces = [GaussianStats.from_embeddings(chunk.clone()) for chunk in torch.tensor_split(x, cuts)]
    for order in (list(range(parts)), rng.permutation(parts).tolist()):
        merged = GaussianStats.empty(6, 5, "cpu")
        for i in order:  # sequential reduce, in a shuffled order on the second pass
            merged = merged.merge(pieces[i])
        assert merged.count == 13
        assert rel(merged.mean, whole.mean) < MEAN_RTOL
        assert rel(covariance(merged), covariance(whole)) < COV_RTOL
    # A tree reduce (pairs, then pairs of pairs) gives the same again.
    level = list(pieces)
    while len(level) > 1:
        level = [level[i].merge(level[i + 1]) if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
    assert rel(level[0].mean, whole.mean) < MEAN_RTOL
    assert rel(covariance(level[0]), covariance(whole)) < COV_RTOL


def test_parts_of_a_single_image_merge_exactly():
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.normal(size=(7, 4, 3)) + 5.0)
    singles = [GaussianStats.from_embeddings(x[i : i + 1].clone()) for i in range(7)]
    assert all(float(s.scatter.abs().max()) == 0.0 for s in singles)  # one image: no spread yet
    merged = singles[3]
    for i in (6, 0, 2, 5, 1, 4):
        merged = merged.merge(singles[i])
    whole = GaussianStats.from_embeddings(x.clone())
    assert rel(merged.mean, whole.mean) < MEAN_RTOL
    assert rel(covariance(merged), covariance(whole)) < COV_RTOL


def test_shards_are_contiguous_and_cover_everything():
    assert shard_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert shard_bounds(2, 5) == [(0, 1), (1, 2)]
    assert shard_bounds(5, 1) == [(0, 5)]


def test_bare_ray_flag_means_local():
    assert expand_bare_ray(["fit", "x", "--ray"]) == ["fit", "x", "--ray", "local"]
    assert expand_bare_ray(["fit", "x", "--ray", "-o", "m"]) == ["fit", "x", "--ray", "local", "-o", "m"]
    assert expand_bare_ray(["fit", "x", "--ray", "local:2"]) == ["fit", "x", "--ray", "local:2"]


def test_without_ray_the_cli_says_how_to_install_it(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from fastpadim.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    result = CliRunner().invoke(app, ["fit", str(tmp_path), "--ray", "local:2", "-o", str(tmp_path / "m.padim")])
    assert result.exit_code == 1
    assert "pip install 'fastpadim[ray]'" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.padim").exists()


# ------------------------------------------------------------------------------------------ local Ray
@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'fastpadim[ray]')")
    from fastpadim.distributed import connect

    connect("local:2")
    yield ray
    ray.shutdown()


def small_images(folder: Path, n: int, size: int | tuple[int, int] = 64, seed: int = 0) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if isinstance(size, int) else (*size, 3)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img_{i:02d}.png"
        Image.fromarray((np.full(shape, 110) + rng.integers(0, 60, shape)).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def tiny_model() -> Padim:
    return Padim(weights="random", image_size=64, crop_size=None, device="cpu", batch_size=4, holdout=0.2, workers=1)


def assert_same_model(a: Padim, b: Padim) -> None:
    assert a.n_samples_seen_ == b.n_samples_seen_
    assert torch.equal(a.channel_indices_, b.channel_indices_)
    assert rel(a.stats_.mean, b.stats_.mean) < MEAN_RTOL
    assert rel(covariance(a.stats_), covariance(b.stats_)) < COV_RTOL
    assert a.threshold_ == pytest.approx(b.threshold_, rel=1e-5)


def items(paths) -> list[Item]:
    return [Item(str(p)) for p in paths]


def test_ray_fit_with_a_corrupt_image_equals_the_single_process_fit(ray_session, tmp_path):
    paths = small_images(tmp_path / "imgs", 15)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    listed = sorted((tmp_path / "imgs").glob("*.png"))
    single = tiny_model().fit(listed)
    on_ray = fit_items(tiny_model(), items(listed), ray_target="local:2")
    assert_same_model(single, on_ray)
    assert [name for name, _ in on_ray.skipped_] == [name for name, _ in single.skipped_] == [str(tmp_path / "imgs" / "broken.png")]
    assert len(paths) == 15


def test_ray_fit_sets_the_local_fits_out_of_fold_threshold(ray_session, tmp_path):
    """The folds, their models and their scores are the local fit's: the threshold is the same number."""
    paths = small_images(tmp_path / "imgs", 12, seed=4)
    params = dict(weights="random", image_size=64, crop_size=None, n_features=20, device="cpu", batch_size=4,
                  folds=2, false_alarm_rate=0.1, workers=1)
    single = Padim(**params).fit(paths)
    on_ray = fit_items(Padim(**params), items(paths), ray_target="local:2", shards=2)
    assert on_ray.n_samples_seen_ == single.n_samples_seen_ == 12
    assert on_ray.calibration_.method == single.calibration_.method == "out-of-fold"
    assert on_ray.calibration_.folds == 2 and on_ray.threshold_count_ == single.threshold_count_ == 12
    np.testing.assert_allclose(on_ray.calibration_.scores, single.calibration_.scores, rtol=1e-5)
    assert on_ray.threshold_ == pytest.approx(single.threshold_, rel=1e-5)
    assert on_ray.threshold_rate_ == single.threshold_rate_ == 0.1
    assert_same_model(single, on_ray)
    # leave-one-out (the default, folds="all"): scored after the fit, on the driver too
    loo = dict(params, folds="all")
    single, on_ray = Padim(**loo).fit(paths), fit_items(Padim(**loo), items(paths), ray_target="local:2", shards=2)
    assert on_ray.calibration_.folds == single.calibration_.folds == "all"
    assert on_ray.threshold_ == pytest.approx(single.threshold_, rel=1e-5)
    # the workers score with the fitted (compacted) state the driver sends them: the hold-out threshold too
    held = dict(params, folds=0, holdout=0.25)
    single, on_ray = Padim(**held).fit(paths), fit_items(Padim(**held), items(paths), ray_target="local:2", shards=2)
    assert on_ray.calibration_.method == single.calibration_.method == "hold-out"
    assert on_ray.threshold_ == pytest.approx(single.threshold_, rel=1e-5)


def test_a_worker_killed_mid_shard_is_retried_and_the_model_is_unchanged(ray_session, tmp_path):
    paths = small_images(tmp_path / "imgs", 16, seed=3)
    marker = tmp_path / "crashed-once"
    params = dict(weights="random", image_size=64, crop_size=None, device="cpu", batch_size=4, holdout=0.0, workers=1)
    faulty = fit_items(Padim(**params), items(paths), ray_target="local:2",
                       task_options={"runtime_env": {"env_vars": {FAULT_MARKER_ENV: str(marker)}}})
    assert marker.exists()  # a worker did die after its first batch (of 2 in its shard) ...
    single = Padim(**params).fit(paths)
    assert faulty.n_samples_seen_ == 16
    assert rel(faulty.stats_.mean, single.stats_.mean) < MEAN_RTOL  # ... and its shard was run again from the start
    assert rel(covariance(faulty.stats_), covariance(single.stats_)) < COV_RTOL


def test_predict_on_ray_writes_parquet_and_resumes(ray_session, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    paths = small_images(tmp_path / "train", 10)
    model = Padim(weights="random", image_size=64, crop_size=None, device="cpu", holdout=0.2, workers=1).fit(paths)
    model.save(tmp_path / "m.padim")
    test = small_images(tmp_path / "test", 5, seed=9)
    (tmp_path / "test" / "bad.png").write_bytes(b"nope")
    first = [Item(str(p)) for p in sorted((tmp_path / "test").glob("*.png"))[:4]]
    counts = predict_on_ray(tmp_path / "m.padim", first, tmp_path / "out", "local:2", maps=True, root=tmp_path / "test")
    assert counts == {"scored": 3, "anomalous": counts["anomalous"], "errors": 1, "already": 0}

    everything = [Item(str(p)) for p in sorted((tmp_path / "test").glob("*.png"))]
    counts = predict_on_ray(tmp_path / "m.padim", everything, tmp_path / "out", "local:2", maps=True, root=tmp_path / "test")
    assert counts["already"] == 4 and counts["scored"] == 2 and counts["errors"] == 0  # only the new ones

    table = pq.read_table(tmp_path / "out" / "scores").to_pylist()
    assert all(r["map"] is None for r in table if r["error"])
    assert sorted(r["name"] for r in table) == sorted(i.name for i in everything)  # each once
    assert scored_names(tmp_path / "out") == {i.name for i in everything}
    by_name = {r["name"]: r for r in table}
    bad = by_name[str(tmp_path / "test" / "bad.png")]
    assert bad["score"] is None and "bad.png" in bad["error"] and bad["verdict"] == "error"
    expected = dict(zip(map(str, test), model.score_images(test)[0]))
    loaded = Padim.load(tmp_path / "m.padim", device="cpu")
    for name, score in expected.items():
        row = by_name[name]
        assert row["score"] == pytest.approx(float(score), rel=1e-4)
        assert row["verdict"] == ("anomalous" if row["score"] > loaded.threshold_ else "good")
        assert row["normalized"] == pytest.approx(row["score"] / loaded.threshold_, rel=1e-6)
        assert row["false_alarm_probability"] == pytest.approx(
            loaded.calibration_.false_alarm_probability(row["score"]), rel=1e-3)
        saved = np.load(row["map"])
        assert saved.shape == (64, 64) and float(saved.max()) == pytest.approx(row["score"], rel=1e-4)


# Rectangular frames, pooled, tiled: the shards build the same model (the parameters travel to the workers), and
# with shared tiles every tile is a sample of the merged statistics (the driver counts images, not tiles).
FRAME_MODELS = {
    "rectangular pooled": dict(image_size=(48, 64), pool=2),
    "shared tiles": dict(image_size=(64, 96), tile=32, tile_shared=True),
}


@pytest.mark.parametrize("kind", FRAME_MODELS)
def test_ray_fit_and_predict_of_frame_models_equal_the_single_process(ray_session, tmp_path, kind):
    params = dict(weights="random", n_features=20, device="cpu", batch_size=4, holdout=0.2, workers=1,
                  **FRAME_MODELS[kind])
    size = params["image_size"]
    paths = small_images(tmp_path / "imgs", 12, size=size)
    single = Padim(**params).fit(paths)
    on_ray = fit_items(Padim(**params), items(paths), ray_target="local:2", shards=2)
    assert on_ray.positions_ == single.positions_ and on_ray.n_samples_seen_ == single.n_samples_seen_ == 10
    assert_same_model(single, on_ray)
    on_ray.save(tmp_path / "m.padim")
    test = small_images(tmp_path / "test", 3, size=size, seed=5)
    counts = predict_on_ray(tmp_path / "m.padim", items(test), tmp_path / "out", "local:2", maps=True,
                            root=tmp_path / "test")
    assert counts["scored"] == 3
    pq = pytest.importorskip("pyarrow.parquet")
    rows = {r["name"]: r for r in pq.read_table(tmp_path / "out" / "scores").to_pylist()}
    for path, score in zip(test, single.score_images(test)[0]):
        assert rows[str(path)]["score"] == pytest.approx(float(score), rel=1e-4)
        assert np.load(rows[str(path)]["map"]).shape == size


@pytest.mark.slow
def test_ray_fit_on_bottle_equals_the_single_process_fit(ray_session, tmp_path):
    train = sorted((BOTTLE / "train" / "good").glob("*.png"))[:30]
    test = sorted((BOTTLE / "test" / "broken_large").glob("*.png"))[:4] + sorted((BOTTLE / "test" / "good").glob("*.png"))[:4]
    if len(train) < 30 or len(test) < 8:
        pytest.skip(f"MVTec AD bottle not found at {BOTTLE}")
    single = Padim(device="cpu").fit(train)
    on_ray = fit_items(Padim(device="cpu"), items(train), ray_target="local:2")
    single.save(tmp_path / "single.padim")
    on_ray.save(tmp_path / "ray.padim")

    meta_a, tensors_a = read_model_file(tmp_path / "single.padim")
    meta_b, tensors_b = read_model_file(tmp_path / "ray.padim")
    threshold_a, threshold_b = meta_a.pop("threshold"), meta_b.pop("threshold")
    calibration_a, calibration_b = meta_a.pop("calibration"), meta_b.pop("calibration")
    meta_a.pop("history"), meta_b.pop("history")  # dates and the inputs' digest (the Ray fit records none)
    assert meta_a == meta_b
    assert threshold_a["n_good_images"] == threshold_b["n_good_images"] == 30  # out-of-fold: every image
    assert calibration_a["method"] == calibration_b["method"] == "out-of-fold"
    # Leave-one-out divides by 1 − the image's leverage, which is near 1 with 30 images and 176 channels: the
    # factor's float32 rounding differences (below) come out about ten times larger in these scores.
    np.testing.assert_allclose(calibration_b["scores"], calibration_a["scores"], rtol=2e-3)
    assert threshold_b["image"] == pytest.approx(threshold_a["image"], rel=2e-3)
    assert torch.equal(tensors_a["channel_indices"], tensors_b["channel_indices"])
    assert rel(tensors_a["mean"], tensors_b["mean"]) < MEAN_RTOL
    assert rel(tensors_a["scatter"], tensors_b["scatter"]) < COV_RTOL
    # The factor is the inverse Cholesky factor: conditioning amplifies float32 feature rounding a little.
    assert rel(single.whitener_, on_ray.whitener_) < 1e-3
    np.testing.assert_allclose(on_ray.score_images(test)[0], single.score_images(test)[0], rtol=1e-4)
