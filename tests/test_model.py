"""The Padim estimator: streaming fit, partial_fit, determinism, thresholds, scoring and predict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SMALL, make_surfaces, with_spot
from fastpadim import Padim
from fastpadim.errors import FastpadimError
from fastpadim.gaussian import mahalanobis

# Streaming vs one-shot: the same embeddings summed in another order; float32 features, float32 factor.
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def one_shot(train_arrays):
    return Padim(**SMALL, batch_size=64).fit(train_arrays)


def assert_same_model(a: Padim, b: Padim, images) -> None:
    assert a.n_samples_seen_ == b.n_samples_seen_
    assert torch.equal(a.channel_indices_, b.channel_indices_)
    torch.testing.assert_close(a.mean_, b.mean_, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(a.whitener_, b.whitener_, rtol=RTOL, atol=ATOL * float(b.whitener_.abs().max()))
    np.testing.assert_allclose(a.score_images(images)[0], b.score_images(images)[0], rtol=RTOL)


@pytest.mark.parametrize("batch_size", [1, 7])
def test_streaming_fit_equals_one_shot(batch_size, train_arrays, test_arrays, one_shot):
    streamed = Padim(**SMALL, batch_size=batch_size).fit(train_arrays)
    assert_same_model(streamed, one_shot, test_arrays)


def test_partial_fit_in_pieces_equals_one_shot(train_arrays, test_arrays, one_shot):
    model = Padim(**SMALL, batch_size=5)
    for piece in (train_arrays[:3], train_arrays[3:10], train_arrays[10:]):
        model.partial_fit(piece)
    assert_same_model(model, one_shot, test_arrays)


def test_partial_fit_never_predicts_with_the_old_threshold(train_arrays, test_arrays, one_shot):
    model = Padim(**{**SMALL, "holdout": 0.0}).fit(train_arrays[:9], threshold_images=test_arrays)
    threshold = model.threshold_
    assert threshold is not None and model.n_samples_seen_ == 9
    model.partial_fit(iter(train_arrays[9:]))  # any iterable, consumed in batches
    assert_same_model(model, one_shot, test_arrays)  # the Gaussians are those of one fit on all 16
    # the threshold was set for the 9-image Gaussians: predicting (and reading it) is refused, not stale verdicts
    with pytest.raises(FastpadimError, match="set for the model fitted on 9 images.*now hold 16"):
        model.predict(test_arrays)
    with pytest.raises(FastpadimError, match="set it again"):
        _ = model.threshold_
    # set again from good images: verdicts are back, from the updated Gaussians
    model.set_threshold(test_arrays)
    assert model.predict(test_arrays).is_anomalous is not None
    again = Padim(**{**SMALL, "holdout": 0.0}).fit(train_arrays[:9])
    again.partial_fit(train_arrays[9:], threshold_images=test_arrays)
    assert again.threshold_ == model.threshold_ != threshold


def test_a_stale_threshold_stays_refused_after_save_and_load(train_arrays, test_arrays, tmp_path):
    model = Padim(**{**SMALL, "holdout": 0.0}).fit(train_arrays[:9], threshold_images=test_arrays)
    model.partial_fit(train_arrays[9:])
    model.save(tmp_path / "m.padim")
    loaded = Padim.load(tmp_path / "m.padim", device="cpu")
    with pytest.raises(FastpadimError, match="set for the model fitted on 9 images"):
        loaded.predict(test_arrays[:1])


def test_fit_on_a_folder_glob_or_list_file_reads_the_images(image_folder, tmp_path, train_arrays):
    """A path string means what it means on the command line, never the characters of the string."""
    files = sorted(image_folder.glob("*.png"))
    by_folder = Padim(**SMALL).fit(str(image_folder))
    assert by_folder.n_samples_seen_ == len(files) and by_folder.skipped_ == []
    by_glob = Padim(**SMALL).fit(f"{image_folder}/*.png")
    listing = tmp_path / "good.txt"
    listing.write_text("\n".join(str(f) for f in files))
    by_list = Padim(**SMALL).fit(listing)
    by_paths = Padim(**SMALL).fit([str(f) for f in files])
    for model in (by_glob, by_list):
        assert torch.equal(model.mean_, by_paths.mean_)
    assert torch.equal(by_folder.mean_, by_paths.mean_)
    prediction = by_folder.predict(str(image_folder))
    assert len(prediction.scores) == len(files) and prediction.names == [str(f) for f in files]


@pytest.mark.parametrize("params, field", [
    ({"n_features": 0}, "n_features"), ({"seed": -1}, "seed"), ({"holdout": 1.0}, "holdout"),
    ({"epsilon": float("nan")}, "epsilon"), ({"blur_sigma": -3}, "blur_sigma"), ({"n_features": "many"}, "n_features"),
    ({"false_alarm_rate": 0.0}, "false_alarm_rate"),
])
def test_bad_parameters_are_one_line_naming_the_parameter(train_arrays, params, field):
    with pytest.raises(FastpadimError, match=f"^{field} must be"):
        Padim(**{**SMALL, "holdout": 0.1, **params}).fit(train_arrays)


def test_fit_takes_a_generator_and_single_images(train_arrays):
    model = Padim(**SMALL, batch_size=4).fit(a for a in train_arrays[:6])
    assert model.n_samples_seen_ == 6
    scores, maps = model.score_images(train_arrays[0])  # one array on its own
    assert scores.shape == (1,) and maps.shape == (1, 64, 64)
    batch = torch.from_numpy(np.stack(train_arrays[:3])).permute(0, 3, 1, 2)  # a (N, 3, H, W) uint8 tensor
    assert model.score_images(batch)[0].shape == (3,)


def test_fewer_than_two_images_is_a_clear_error(train_arrays, tmp_path):
    with pytest.raises(FastpadimError, match="at least 2"):
        Padim(**SMALL).fit(train_arrays[:1])
    with pytest.raises(FastpadimError, match="at least 2"):
        Padim(**SMALL).fit([])
    with pytest.raises(FastpadimError, match="at least 2"):
        Padim(**SMALL).partial_fit(train_arrays[:1])
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(FastpadimError, match="at least 2.*1 unreadable"):
        Padim(**SMALL).fit([train_arrays[0], tmp_path / "bad.png"])
    # With a hold-out, two images are too few to keep one apart and fit on two.
    with pytest.raises(FastpadimError, match="too few"):
        Padim(**{**SMALL, "holdout": 0.1}).fit(train_arrays[:2])


def test_same_seed_same_model_and_scores(train_arrays, test_arrays):
    a = Padim(**SMALL, seed=3).fit(train_arrays)
    b = Padim(**SMALL, seed=3).fit(train_arrays)
    assert torch.equal(a.channel_indices_, b.channel_indices_)
    assert torch.equal(a.mean_, b.mean_) and torch.equal(a.whitener_, b.whitener_)
    sa, ma = a.score_images(test_arrays)
    sb, mb = b.score_images(test_arrays)
    np.testing.assert_array_equal(sa, sb)
    np.testing.assert_array_equal(ma, mb)


def test_different_seed_different_channel_subset(one_shot):
    other = Padim(**SMALL, seed=1).fit(make_surfaces(3))
    assert one_shot.channel_indices_.numel() == other.channel_indices_.numel() == 100  # Rd 100 of 448
    assert not torch.equal(one_shot.channel_indices_, other.channel_indices_)
    for indices in (one_shot.channel_indices_, other.channel_indices_):
        assert bool(torch.all(indices[1:] > indices[:-1])) and int(indices.max()) < 448


def test_scores_follow_the_reference_distances(one_shot, test_arrays):
    """The model's maps are the per-position distances (upsampled and blurred); their max is the score."""
    from fastpadim.images import iter_batches, stack

    scores, maps = one_shot.score_images(test_arrays)
    assert maps.shape == (4, 64, 64) and (maps >= 0).all()
    np.testing.assert_allclose(scores, maps.reshape(4, -1).max(axis=1))
    batch = stack(next(iter_batches(test_arrays, one_shot.preprocessing_, 8)))
    embeddings = one_shot._embed(batch).double().numpy()
    stats = one_shot.stats_
    mean = stats.mean.numpy()
    covs = stats.covariance(one_shot.epsilon).numpy()  # (P, D, D), Σ = M / (N - 1) + εI
    centred = (embeddings - mean).transpose(1, 2, 0)  # (P, D, B)
    distances = np.sqrt(np.einsum("pdb,pdb->bp", centred, np.linalg.solve(covs, centred)))
    model_distances = mahalanobis(torch.from_numpy(embeddings).float(), one_shot.mean_, one_shot.whitener_).numpy()
    np.testing.assert_allclose(model_distances, distances, rtol=1e-4)
    h, w = one_shot.grid_
    expected_maps = one_shot.map_generator_(torch.from_numpy(distances).float().view(-1, h, w)).numpy()
    np.testing.assert_allclose(maps, expected_maps, rtol=1e-3, atol=1e-3)


def test_an_obvious_defect_scores_higher_and_is_located(one_shot, test_arrays):
    good = one_shot.score_images(test_arrays)[0]
    defective, maps = one_shot.score_images([with_spot(a) for a in test_arrays])
    assert (defective > good).all()
    # The hottest point lies in or near the painted square (rows/cols 21..32 of 64).
    for amap in maps:
        y, x = np.unravel_index(amap.argmax(), amap.shape)
        assert 12 <= y <= 40 and 12 <= x <= 40


def test_holdout_sets_a_threshold_used_by_predict(fitted, test_arrays, tmp_path):
    assert fitted.n_samples_seen_ == 12 and fitted.threshold_count_ == 4  # 16 images, 25 % held out
    assert fitted.threshold_ > 0
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    items = [test_arrays[0], tmp_path / "broken.png", with_spot(test_arrays[1])]
    result = fitted.predict(items)
    assert result.names == ["<image 0>", "<image 2>"]
    assert len(result.skipped) == 1 and "broken.png" in result.skipped[0][0]
    np.testing.assert_array_equal(result.is_anomalous, result.scores > fitted.threshold_)
    assert result.is_anomalous[1]  # the white square
    assert result.threshold == fitted.threshold_
    with pytest.raises(FastpadimError, match="broken.png"):
        fitted.score_images(items)  # score_images() is strict: it does not skip silently


def test_threshold_from_separate_images_and_none_without_holdout(train_arrays, test_arrays):
    no_threshold = Padim(**SMALL).fit(train_arrays[:4])
    assert no_threshold.threshold_ is None and no_threshold.predict(test_arrays[:1]).is_anomalous is None
    model = Padim(**SMALL, false_alarm_rate=0.01).fit(train_arrays, threshold_images=test_arrays)
    assert model.n_samples_seen_ == len(train_arrays)
    scores = model.score_images(test_arrays)[0]
    assert model.threshold_ == pytest.approx(float(scores.max()), rel=1e-6)  # 99 % quantile of 4 = the highest


def test_unfitted_model_and_bad_parameters(train_arrays):
    with pytest.raises(FastpadimError, match="not fitted"):
        Padim(**SMALL).score_images(train_arrays[:1])
    for bad in ({"epsilon": -1}, {"holdout": 1.0}, {"false_alarm_rate": 0.0}, {"factor_dtype": "int8"},
                {"n_features": 5000}, {"backbone": "no_such_preset"}):
        with pytest.raises(FastpadimError):
            Padim(**{**SMALL, **bad}).fit(train_arrays[:3])


def test_half_precision_factor_scores_close(train_arrays, test_arrays, one_shot):
    half = Padim(**SMALL, factor_dtype="bfloat16").fit(train_arrays)
    assert half.whitener_.dtype == torch.bfloat16
    np.testing.assert_allclose(half.score_images(test_arrays)[0], one_shot.score_images(test_arrays)[0], rtol=0.05)


def test_iter_scored_keeps_the_view(one_shot, test_arrays):
    batches = list(one_shot.iter_scored(test_arrays[:3], keep_view=True))
    results = [r for b in batches for r in b]
    assert [r.index for r in results] == [0, 1, 2]
    for r, array in zip(results, test_arrays):
        assert r.error is None and r.anomaly_map.shape == (64, 64) and r.anomaly_map.dtype == np.float32
        np.testing.assert_array_equal(r.view, array)  # resize to the same size: the view is the input


def test_works_on_images_of_any_size(one_shot):
    big = make_surfaces(2, size=150, seed=7)
    assert one_shot.score_images(big)[1].shape == (2, 64, 64)


def test_a_single_pil_image_on_its_own(one_shot, test_arrays):
    from PIL import Image

    scores, maps = one_shot.score_images(Image.fromarray(test_arrays[0]))
    assert scores.shape == (1,)
    np.testing.assert_allclose(scores, one_shot.score_images([Image.fromarray(test_arrays[0])])[0])


def test_a_fitted_model_keeps_the_statistics_its_file_stores(train_arrays, test_arrays, one_shot, tmp_path):
    """finish compacts the statistics to float32 (as the file stores them) and factors those: the fitted model and
    its saved file score identically, and scores move by about 1e-6 from float64 statistics."""
    assert one_shot.stats_.scatter.dtype == torch.float32
    one_shot.save(tmp_path / "m.padim")
    loaded = Padim.load(tmp_path / "m.padim", device="cpu")
    np.testing.assert_array_equal(loaded.anomaly_scores(test_arrays), one_shot.anomaly_scores(test_arrays))
    exact = Padim(**SMALL).prepare().accumulate(train_arrays).stats_  # float64, never compacted
    whitener = exact.whitener(one_shot.epsilon)
    exact_model = Padim(**SMALL).prepare().install(exact.mean.float(), whitener, exact.count)
    np.testing.assert_allclose(one_shot.anomaly_scores(test_arrays), exact_model.anomaly_scores(test_arrays), rtol=1e-5)


def test_fit_inside_inference_mode(train_arrays, test_arrays, one_shot):
    """The factorisation runs in a thread pool; it must follow the caller's (thread-local) inference mode."""
    with torch.inference_mode():
        model = Padim(**SMALL, batch_size=64).fit(train_arrays)
        scores = model.anomaly_scores(test_arrays)
    np.testing.assert_allclose(scores, one_shot.anomaly_scores(test_arrays), rtol=1e-6)


def test_other_layers_keep_at_most_their_channels(train_arrays):
    """A preset's Rd size (R18: 100) caps the channels of other layers (layer 1 has 64), an explicit one does not."""
    only_layer1 = Padim(**{**SMALL, "layers": (1,)}).fit(train_arrays[:3])
    assert only_layer1.channel_indices_.numel() == 64  # resnet18 layer1: all 64 channels
    assert Padim(**{**SMALL, "layers": (1, 2)}).fit(train_arrays[:3]).channel_indices_.numel() == 100  # 192 → Rd100
    with pytest.raises(FastpadimError, match="between 1 and 64"):
        Padim(**{**SMALL, "layers": (1,), "n_features": 100}).fit(train_arrays[:3])


def test_prepare_reuses_the_network_built_for_the_same_parameters(train_arrays, monkeypatch):
    """A memory plan (prepare) then fit build the network once; changed parameters build it again."""
    from fastpadim import model as model_module

    built = []
    real = model_module.create_feature_extractor
    monkeypatch.setattr(model_module, "create_feature_extractor", lambda *a: built.append(1) or real(*a))
    model = Padim(**SMALL)
    model.prepare()
    model.fit(train_arrays[:4])
    assert len(built) == 1
    model.set_params(seed=5).fit(train_arrays[:4])
    assert len(built) == 2


def test_pca_refit_on_the_same_object_learns_from_unprojected_embeddings(train_arrays, test_arrays):
    from fastpadim.evaluation.ablation import PcaPadim

    model = PcaPadim(**{**SMALL, "n_features": 8})
    first = model.fit(train_arrays).anomaly_scores(test_arrays)
    again = model.fit(train_arrays).anomaly_scores(test_arrays)  # the network is reused: the projection must be redone
    np.testing.assert_allclose(again, first, rtol=1e-5)
