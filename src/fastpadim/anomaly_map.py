"""From patch distances to the anomaly map and the image score, as in the paper."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    radius = int(4.0 * sigma + 0.5)  # same support as scipy.ndimage.gaussian_filter (truncate=4)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


class AnomalyMapGenerator(nn.Module):
    """Distances (B, h, w) → bicubic upsampling to the input size → separable Gaussian blur (σ = 4).

    The blur pads by reflection, so borders are not darkened; the map is clamped at 0 because bicubic
    interpolation may overshoot below the (non-negative) distances.
    """

    def __init__(self, output_size: tuple[int, int], sigma: float = 4.0):
        super().__init__()
        self.output_size = tuple(output_size)  # (height, width)
        self.sigma = sigma
        kernel = gaussian_kernel1d(sigma) if sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        maps = distances.unsqueeze(1).float()
        maps = F.interpolate(maps, size=self.output_size, mode="bicubic", align_corners=False)
        if self.sigma > 0:
            k = self.kernel.to(maps.device)
            pad = k.numel() // 2
            maps = F.conv2d(F.pad(maps, (pad, pad, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
            maps = F.conv2d(F.pad(maps, (0, 0, pad, pad), mode="reflect"), k.view(1, 1, -1, 1))
        return maps.squeeze(1).clamp_(min=0.0)


def image_scores(maps: torch.Tensor) -> torch.Tensor:
    """Image score = maximum of the anomaly map."""
    return maps.flatten(1).amax(dim=1)
