"""The paper's ablations (Tables I and II) as estimators with Padim's fit / iter_scored interface:

- ``PcaPadim``: reduce the embedding to ``n_features`` dimensions by PCA (the directions of largest variance of
  all training embedding vectors, pooled over positions) instead of a random channel subset.
- ``SummedPadim``: one Padim per layer, fitted separately; the anomaly maps are summed, the image score is
  the summed map's maximum ("layer 1 + layer 2 + layer 3" in Table I).

Evaluation only: these models are not saved to model files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from ..anomaly_map import image_scores
from ..errors import FastpadimError
from ..images import ImageInput
from ..model import Padim
from ..results import ScoredImage

REDUCTIONS = ("random", "pca")
LAYER_MODES = ("joint", "summed")


class PcaPadim(Padim):
    """Padim on all channels of its layers, projected onto the top ``n_features`` principal components."""

    def _build(self, preset, channel_indices=None) -> None:
        self.n_components_ = preset.n_features or None
        super()._build(dataclasses.replace(preset, n_features=0), channel_indices)  # 0 → keep every channel
        # Padim.fit rebuilds the extractor before accumulating: attach the projection found beforehand.
        self.pca_mean_, self.components_ = getattr(self, "_pending_pca", (None, None))

    @torch.inference_mode()
    def _embed(self, batch: torch.Tensor) -> torch.Tensor:
        embeddings = super()._embed(batch)
        if self.components_ is None:
            return embeddings
        return (embeddings - self.pca_mean_) @ self.components_

    def fit(self, images: Iterable[ImageInput], threshold_images=None, progress=None) -> PcaPadim:
        images = list(images)
        self._pending_pca = self.pca_mean_, self.components_ = (None, None)  # embeddings unprojected while learning it
        self.prepare()  # the feature model, to know how many channels the projection starts from
        total = self.channel_indices_.numel()
        k = self.n_components_ or total
        if not 0 < k <= total:
            raise FastpadimError(f"n_features must be between 1 and {total} for PCA on these layers, got {k}")
        count = 0
        total_sum = torch.zeros(total, dtype=torch.float64)
        outer = torch.zeros(total, total, dtype=torch.float64)
        for batch in self._batches(images):
            good = [item.tensor for item in batch if item.tensor is not None]
            if good:
                vectors = self._embed(torch.stack(good)).reshape(-1, total).double().cpu()
                count += vectors.shape[0]
                total_sum += vectors.sum(0)
                outer += vectors.T @ vectors
        if count < 2:
            raise FastpadimError("PCA needs at least 2 readable training images")
        mean = total_sum / count
        covariance = (outer - count * torch.outer(mean, mean)) / (count - 1)
        _, eigenvectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
        components = eigenvectors[:, -k:].flip(1).float().to(self.device_)
        # attached now (the network is reused by fit's prepare) and kept for any later rebuild
        self._pending_pca = self.pca_mean_, self.components_ = (mean.float().to(self.device_), components)
        return super().fit(images, threshold_images, progress)

    def save(self, path) -> None:
        # The model file has no place for the projection; a file without it would score wrongly.
        raise FastpadimError("PCA-reduced models are for evaluation only and cannot be saved")


class SummedPadim:
    """One Padim per layer (same backbone and settings), fitted separately; anomaly maps summed."""

    def __init__(self, layers: Iterable[int], n_features: int | None = None, **padim_kwargs):
        self.layers = tuple(layers)
        if len(self.layers) < 2:
            raise FastpadimError("summed separate models need at least two layers, e.g. --layers 1,2,3")
        self.n_features = n_features
        self.padim_kwargs = padim_kwargs

    def _member(self, layer: int) -> Padim:
        """A one-layer Padim keeping min(n_features, that layer's channels) random channels (all by default)."""
        if self.n_features is None:
            return Padim(layers=(layer,), n_features="all", **self.padim_kwargs)
        # the layer's channel count needs the network: built once here to read it
        probe = Padim(layers=(layer,), n_features="all", **self.padim_kwargs).prepare()
        return Padim(layers=(layer,), n_features=min(self.n_features, probe.channel_indices_.numel()), **self.padim_kwargs)

    def fit(self, images: Iterable[ImageInput], threshold_images=None, progress=None) -> SummedPadim:
        images = list(images)
        self.members_ = [self._member(layer).fit(images, progress=progress) for layer in self.layers]
        first = self.members_[0]
        self.preprocessing_ = first.preprocessing_
        self.preset_, self.weights_id_, self.device_ = first.preset_, first.weights_id_, first.device_
        self.n_samples_seen_ = first.n_samples_seen_
        self.threshold_ = None
        return self

    def iter_scored(self, images: Iterable[ImageInput], keep_view: bool = False, progress=None) -> Iterator[list[ScoredImage]]:
        images = list(images)
        streams = [m.iter_scored(images, keep_view=keep_view and i == 0, progress=progress if i == 0 else None)
                   for i, m in enumerate(self.members_)]
        for batches in zip(*streams):
            merged = []
            for results in zip(*batches):
                first = results[0]
                errors = [r.error for r in results if r.error]
                if errors:
                    merged.append(ScoredImage(first.index, first.name, error=errors[0]))
                    continue
                summed = np.sum([r.anomaly_map for r in results], axis=0)
                score = float(image_scores(torch.from_numpy(summed[None]))[0])
                # to_frame is linear (crop put back with zeros, bilinear resize): the sum of the members' frame
                # maps is the frame map of the sum, made once here from the one frame kept (member 0's)
                frame_map = None if first.view is None else self.preprocessing_.to_frame(summed, first.view.shape[:2])
                merged.append(ScoredImage(first.index, first.name, score, summed, first.view, frame_map=frame_map))
            yield merged
