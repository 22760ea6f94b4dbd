"""From patch distances to the anomaly map and the image score, as in the paper."""

from __future__ import annotations

import numpy as np
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
            maps = _blur(_blur(maps, self.kernel, axis=3), self.kernel, axis=2)
        return maps.squeeze(1).clamp_(min=0.0)


def _blur(maps: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    """The 1-D Gaussian along ``axis`` (3: width, 2: height) of (B, 1, H, W) maps, borders padded by reflection."""
    pad = kernel.numel() // 2
    if axis == 3:
        return F.conv2d(F.pad(maps, (pad, pad, 0, 0), mode="reflect"), kernel.to(maps).view(1, 1, 1, -1))
    return F.conv2d(F.pad(maps, (0, 0, pad, pad), mode="reflect"), kernel.to(maps).view(1, 1, -1, 1))


def axis_operator(size_in: int, size_out: int, sigma: float) -> torch.Tensor:
    """What ``AnomalyMapGenerator`` does along one axis (bicubic upsampling, then the blur) as a (size_out,
    size_in) float64 matrix A: the map of distances d (h, w) is then A_h d A_wᵀ before the clamp. Both steps are
    linear and separable, so A is the generator's own operations applied to the identity. An exported graph
    runs it as two matrix products, faster in onnxruntime and OpenVINO than their Resize and Conv kernels."""
    impulses = torch.eye(size_in, dtype=torch.float64).view(size_in, 1, 1, size_in)
    rows = F.interpolate(impulses, size=(1, size_out), mode="bicubic", align_corners=False)
    if sigma > 0:
        rows = _blur(rows, gaussian_kernel1d(sigma).double(), axis=3)
    return rows.view(size_in, size_out).T.contiguous()


def map_operators(grid: tuple[int, int], size: tuple[int, int], sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """The map of a (grid) distance map at ``size``, as two float32 matrices: rows (H, grid_h) and the columns'
    transpose (grid_w, W), so that map = rows · d · columns_t (an export's last products)."""
    return (axis_operator(grid[0], size[0], sigma).float().numpy(),
            axis_operator(grid[1], size[1], sigma).T.float().numpy())


def image_scores(maps: torch.Tensor) -> torch.Tensor:
    """Image score = maximum of the anomaly map."""
    return maps.flatten(1).amax(dim=1)
