import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import f1_score, roc_auc_score

from fastpadim.evaluation import metrics
from fastpadim.errors import FastpadimError


def reference_pro(masks, maps, fpr_limit=0.3):
    """Slow and literal: for every distinct score t (and +inf), predicted = map >= t; FPR over all normal pixels,
    overlap of each 8-connected region; trapezoid up to the limit, interpolated there, divided by the limit."""
    masks = [np.asarray(m, bool) for m in masks]
    maps = [np.asarray(a, float) for a in maps]
    regions = []
    for mask in masks:
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions.append([labelled == k for k in range(1, count + 1)])
    normal_total = sum((~m).sum() for m in masks)
    points = []
    for t in [np.inf, *sorted(np.unique(np.concatenate([a.ravel() for a in maps])), reverse=True)]:
        predicted = [a >= t for a in maps]
        fp = sum((p & ~m).sum() for p, m in zip(predicted, masks))
        overlaps = [(p & r).sum() / r.sum() for p, rs in zip(predicted, regions) for r in rs]
        points.append((fp / normal_total, np.mean(overlaps)))
    fpr, pro = np.array(points).T
    area = 0.0
    for i in range(1, len(fpr)):
        x0, x1, y0, y1 = fpr[i - 1], fpr[i], pro[i - 1], pro[i]
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:  # cut the segment at the limit
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def blob(shape, centre, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def noisy_maps(masks, rng, signal=0.6, levels=None):
    maps = rng.random(masks.shape) + signal * masks
    return np.round(maps, levels) if levels else maps


def case_one_region():
    masks = np.zeros((3, 24, 24), bool)
    masks[0] = blob((24, 24), (12, 12), 5)
    return masks


def case_many_small():
    rng = np.random.default_rng(1)
    masks = np.zeros((2, 24, 24), bool)
    for _ in range(12):
        y, x = rng.integers(1, 22, size=2)
        masks[rng.integers(0, 2), y, x] = True
    return masks


def case_border():
    masks = np.zeros((2, 20, 20), bool)
    masks[0, :6, :4] = True  # touches two borders
    masks[1, 15:, 8:12] = True
    return masks


def case_sizes():
    masks = np.zeros((2, 32, 32), bool)
    masks[0] = blob((32, 32), (14, 14), 10)  # ~300 pixels
    masks[1, 3, 28] = True  # one pixel
    masks[1, 25:27, 3:5] = True  # four pixels
    return masks


CASES = {"one region": case_one_region, "many small regions": case_many_small,
         "region at the border": case_border, "very different sizes": case_sizes}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("levels", [None, 1])  # continuous scores, and heavy ties
def test_pro_matches_slow_reference(name, levels):
    masks = CASES[name]()
    maps = noisy_maps(masks, np.random.default_rng(0), levels=levels)
    hist = metrics.pixel_histograms(masks, maps)
    value, bound = hist.pro(0.3)
    expected = reference_pro(masks, maps)
    assert abs(value - expected) <= bound + 1e-9
    if levels is None:  # with ties the bound is loose (it cannot see that a bin holds one value), not the error
        assert bound < 1e-3
    else:
        assert value == pytest.approx(expected, abs=1e-9)  # one value per bin: binning is exact
    assert metrics.pro_auc(list(masks), list(maps)) == pytest.approx(value)


def test_pro_coarse_bins_stay_within_their_bound():
    masks = case_sizes()
    maps = noisy_maps(masks, np.random.default_rng(2))
    value, bound = metrics.pixel_histograms(masks, maps, n_bins=16).pro(0.3)
    expected = reference_pro(masks, maps)
    assert bound > 1e-4  # coarse bins do cost something, and it shows
    assert abs(value - expected) <= bound + 1e-9


def test_perfect_map_gives_one():
    masks = case_sizes()
    perfect = masks.astype(np.float32) * 5.0
    assert metrics.pro_auc(masks, perfect) == pytest.approx(1.0)
    assert metrics.pixel_auroc(masks, perfect) == pytest.approx(1.0)
    assert metrics.pixel_f1_max(masks, perfect) == pytest.approx(1.0)


def test_random_map_gives_chance_pro():
    # Overlap of a random map equals the FPR on average, so the normalised area up to 0.3 is 0.3 / 2 = 0.15.
    rng = np.random.default_rng(3)
    masks = np.zeros((40, 64, 64), bool)
    for mask in masks:
        for _ in range(4):
            mask |= blob(mask.shape, rng.integers(0, 64, size=2), rng.integers(2, 8))
    maps = rng.random(masks.shape)
    assert metrics.pro_auc(masks, maps) == pytest.approx(0.15, abs=0.015)
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(0.5, abs=0.01)


def test_pixel_auroc_and_f1_agree_with_sklearn():
    rng = np.random.default_rng(4)
    masks = rng.random((6, 40, 40)) < 0.1
    maps = rng.normal(size=masks.shape) + 1.2 * masks
    hist = metrics.pixel_histograms(masks, maps)
    auroc, bound = hist.auroc()
    assert abs(auroc - roc_auc_score(masks.ravel(), maps.ravel())) <= bound
    assert bound < 1e-3
    best, f1_bound, threshold = hist.f1_max()
    exact = max(f1_score(masks.ravel(), maps.ravel() >= t) for t in np.quantile(maps, np.linspace(0.5, 0.99, 60)))
    assert best >= exact - 1e-3  # the grid search is at least as good as a coarse exact one
    assert f1_score(masks.ravel(), maps.ravel() >= threshold) == pytest.approx(best, abs=1e-6)
    assert f1_bound < 1e-2


def test_image_metrics_agree_with_sklearn():
    rng = np.random.default_rng(5)
    labels = rng.random(200) < 0.4
    scores = rng.normal(size=200) + labels
    assert metrics.image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    predicted = scores[None, :] >= scores[:, None]  # every score as a threshold, written out
    tp = (predicted & labels).sum(1)
    exact = (2 * tp / (predicted.sum(1) + labels.sum())).max()
    assert metrics.f1_max(labels, scores) == pytest.approx(exact)


def test_single_class_is_an_error_not_a_number():
    with pytest.raises(FastpadimError, match="both good and anomalous"):
        metrics.image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(FastpadimError, match="no defect"):
        metrics.pixel_auroc(np.zeros((2, 8, 8), bool), np.random.default_rng(0).random((2, 8, 8)))


def test_shape_mismatch_and_nan_are_errors():
    with pytest.raises(FastpadimError, match="anomaly map"):
        metrics.pixel_auroc([np.zeros((8, 8), bool)], [np.zeros((9, 9))])
    with pytest.raises(FastpadimError, match="NaN"):
        metrics.pixel_auroc([np.ones((8, 8), bool)], [np.full((8, 8), np.nan)])


class LazyMaps:
    """Makes each map on demand and remembers how many were ever alive at once (here: one at a time)."""

    def __init__(self, n, shape, seed):
        self.n, self.shape, self.seed, self.requests = n, shape, seed, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.requests += 1
        return np.random.default_rng([self.seed, i]).random(self.shape)


def test_pixel_metrics_stream_one_image_at_a_time():
    lazy = LazyMaps(10, (32, 32), seed=9)
    masks = np.zeros((10, 32, 32), bool)
    masks[::2, 8:20, 5:15] = True
    dense = np.stack([lazy[i] for i in range(10)])
    lazy.requests = 0
    streamed = metrics.pixel_histograms(masks, lazy)
    assert lazy.requests == 20  # one pass for the score range, one for the histograms
    full = metrics.pixel_histograms(masks, dense)
    assert streamed.auroc() == full.auroc() and streamed.pro() == full.pro()
