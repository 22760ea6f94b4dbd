"""Tiling: a frame too large for one pass is cut into tiles on a fixed grid, and their maps stitched back.

The grid is fixed (the same origins for every frame), so each tile position can keep its own per-position
Gaussians: together they cover the frame at full resolution, as PaDiM at the frame's size would, while the
network only ever sees one tile (its activations, not the frame's, bound the memory). Stitching averages the
overlaps, so equal tile maps give an equal frame map (no seams from the weighting); the Gaussian blur that
follows runs over the stitched map, across tile borders.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FastpadimError
from .sizes import Size, format_size


def tile_origins(length: int, tile: int, overlap: int, step: int) -> list[int]:
    """Tile starts along one side: the fewest tiles of ``tile`` px that overlap by at least ``overlap`` and cover
    ``length``, spread evenly, each start a multiple of ``step`` (the last tile ends at the edge)."""
    if tile >= length:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    last = length - tile
    return sorted({int(round(last * i / (count - 1) / step)) * step for i in range(count)})


def check_tiling(frame: Size, tile: int, overlap: int, step: int) -> None:
    if tile % step or overlap % step:
        raise FastpadimError(f"tile {tile} and overlap {overlap} must be multiples of {step} px (the backbone's stride)")
    if not 0 <= overlap < tile:
        raise FastpadimError(f"tile overlap must be at least 0 and below the tile size {tile}, got {overlap}")


class Tiler(nn.Module):
    """Splits (B, 3, H, W) inputs into (B·T, 3, h, w) tiles, and stitches (B, T, gh, gw) tile maps back into the
    frame's (B, GH, GW) grid. ``cell``: input pixels per grid cell. Everything is fixed at build time (slices and
    pads of constant size), so the same module exports to ONNX with the tiles as a batch."""

    def __init__(self, frame: Size, tile: int, overlap: int, step: int, cell: int):
        super().__init__()
        check_tiling(frame, tile, overlap, step)
        self.frame, self.tile, self.overlap = frame, tile, overlap
        self.tile_size: Size = (min(tile, frame[0]), min(tile, frame[1]))
        self.origins = [(top, left) for top in tile_origins(frame[0], tile, overlap, step)
                        for left in tile_origins(frame[1], tile, overlap, step)]
        self.cell = cell
        self.grid = (frame[0] // cell, frame[1] // cell)
        self.tile_grid = (self.tile_size[0] // cell, self.tile_size[1] // cell)
        count = torch.zeros(self.grid)
        for top, left in self.origins:
            count[top // cell: top // cell + self.tile_grid[0], left // cell: left // cell + self.tile_grid[1]] += 1
        self.register_buffer("weight", 1.0 / count, persistent=False)  # every cell is covered: count ≥ 1

    @property
    def n_tiles(self) -> int:
        return len(self.origins)

    def describe(self) -> str:
        rows = len({top for top, _ in self.origins})
        return (f"{self.n_tiles} tiles ({rows}x{self.n_tiles // rows}) of {format_size(self.tile_size)} over "
                f"{format_size(self.frame)}")

    def split(self, images: torch.Tensor) -> torch.Tensor:
        height, width = self.tile_size
        tiles = [images[:, :, top: top + height, left: left + width] for top, left in self.origins]
        return torch.stack(tiles, dim=1).flatten(0, 1)

    def arrange(self, embeddings: torch.Tensor, frames: int, shared: bool) -> torch.Tensor:
        """The tiles' embeddings (B·T, p, D) as the Gaussians take them: one sample per tile (``shared``), or per
        frame with tile-major positions (B, T·p, D), each tile position its own Gaussians."""
        return embeddings if shared else embeddings.reshape(frames, -1, embeddings.shape[-1])

    def stitch(self, tile_maps: torch.Tensor) -> torch.Tensor:
        """(B, T, gh, gw) → (B, GH, GW): each frame cell the mean of the tiles that cover it."""
        (grid_h, grid_w), (tile_h, tile_w) = self.grid, self.tile_grid
        total = None
        for index, (top, left) in enumerate(self.origins):
            top, left = top // self.cell, left // self.cell
            placed = F.pad(tile_maps[:, index], (left, grid_w - left - tile_w, top, grid_h - top - tile_h))
            total = placed if total is None else total + placed
        return total * self.weight
