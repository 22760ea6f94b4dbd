"""The anomaly map's operator (bicubic upsampling, reflection-padded blur) as per-axis matrices, which exported
graphs run: equal to the generator itself for any grid, size and σ."""

from __future__ import annotations

import pytest
import torch

from fastpadim.anomaly_map import AnomalyMapGenerator, axis_operator


@pytest.mark.parametrize("grid, size, sigma", [((64, 64), (256, 256), 4.0), ((28, 40), (224, 320), 4.0),
                                               ((16, 12), (64, 48), 0.0), ((9, 70), (36, 280), 2.0)])
def test_axis_operators_reproduce_the_generator(grid, size, sigma):
    distances = torch.rand(3, *grid, generator=torch.Generator().manual_seed(0)) * 10
    expected = AnomalyMapGenerator(size, sigma)(distances)
    rows, columns = axis_operator(grid[0], size[0], sigma), axis_operator(grid[1], size[1], sigma)
    assert rows.shape == (size[0], grid[0]) and columns.shape == (size[1], grid[1]) and rows.dtype == torch.float64
    got = (rows @ distances.double() @ columns.T).clamp(min=0).float()
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_each_row_of_the_operator_sums_to_one():
    # bicubic weights and the normalised blur both preserve a constant map: a flat distance map stays flat
    operator = axis_operator(32, 128, 4.0)
    assert torch.allclose(operator.sum(dim=1), torch.ones(128, dtype=torch.float64), atol=1e-12)
