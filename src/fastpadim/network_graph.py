"""A model's network as an ONNX graph with what a model file says of it, written by a process that has PyTorch
for one that has not (``fastpadim.onnx_fit``):

    python -m fastpadim.network_graph PARAMETERS.json FOLDER

builds ``Padim(**parameters)`` and writes FOLDER/embedder.onnx (images → embeddings, as ``Padim`` embeds them,
tiles included), FOLDER/network.json and, without tiles, FOLDER/map_operators.npz (what an export needs besides the
fitted state). Errors are one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GRAPH_NAME = "embedder.onnx"
DESCRIPTION_NAME = "network.json"
OPERATORS_NAME = "map_operators.npz"  # rows (H, grid_h), columns_t (grid_w, W): the map from the distances


def write_network(params: dict, folder: Path) -> None:
    import numpy as np
    import onnx

    from .anomaly_map import map_operators
    from .export import backbone_graph
    from .model import Padim
    from .onnx_runtime import DEFAULT_OPSET

    model = Padim(**{**params, "device": "cpu", "engine": "torch"}).prepare()
    onnx.save(backbone_graph(model, DEFAULT_OPSET), str(folder / GRAPH_NAME))
    description = {
        "metadata": model.network_metadata(),
        "channel_indices": model.channel_indices_.tolist(),
        "input_size": list(model.preprocessing_.output_size),
        "embedding": [int(model.positions_), int(model.channel_indices_.numel())],  # (P, D) per sample
        "samples_per_image": model.samples_per_image,
        "images_per_call": model.images_per_call,
    }
    if model.tiler_ is None:  # a tiled model's export (its stitching) is made by the PyTorch path, on first use
        rows, columns_t = map_operators(tuple(model.grid_), tuple(model.preprocessing_.output_size), model.blur_sigma)
        np.savez(folder / OPERATORS_NAME, rows=rows, columns_t=columns_t)
    (folder / DESCRIPTION_NAME).write_text(json.dumps(description))


def main(argv: list[str]) -> int:
    from .errors import FastpadimError

    try:
        write_network(json.loads(Path(argv[0]).read_text()), Path(argv[1]))
    except FastpadimError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
