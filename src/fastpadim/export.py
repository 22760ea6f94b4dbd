"""``fastpadim export``: the whole scoring pipeline as one ONNX graph, to deploy without PyTorch.

The graph maps a preprocessed batch (N, 3, H, W) to anomaly maps (N, H, W) and image scores (N,): the model's
own feature extractor (backbone cut after the deepest used layer, channel subset, average pooling; traced by
PyTorch's ONNX exporter, with a tiled model's tile split in front, the N·T tiles one batch), then the
Mahalanobis distance as batched products with the factor stored at fit time, the tiles' distance maps stitched
back into the frame's grid, bicubic upsampling and the Gaussian blur (two matrix products, ``axis_operator``), and
the max. The factor W is lower triangular, so it is stored as FACTOR_BLOCKS column blocks of Wᵀ that leave out
the zero blocks above the diagonal (5/8 of the full matrices' bytes with 4 blocks): each block's product reads
only its own part of the embedding, and the runtime holds no zeros. Every large tensor is written to one
external data file beside the .onnx, streamed position block by position block, so neither the 2 GB protobuf
limit nor the memory of a second copy of the factor applies. Threshold and preprocessing sit in the metadata, not
in the graph.
With ``int8_images`` the backbone part is quantised to int8 first (``fastpadim.quantize``, opt-in, lossy),
calibrated on those good images; the scoring part stays float32 either way.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from .files import check_writable_file
from .array_ops import is_tensor
from .errors import FastpadimError
from .onnx_runtime import (
    BACKBONE_PRECISIONS, DEFAULT_OPSET, EXPORT_FORMAT_VERSION, INPUT_NAME, MAP_OUTPUT, METADATA_KEY, OPSETS, SCORE_OUTPUT, check_metadata,
)

if TYPE_CHECKING:
    import onnx

    from .model import Padim

FP16_MIN_ELEMENTS = 1024  # smaller tensors (biases, shapes) stay as they are
ALIGN_BYTES = 64 * 1024  # large tensors start on a page boundary, so the runtime can map them
FACTOR_BLOCK_BYTES = 64 * 1024 * 1024  # positions written at a time while writing the factor
# Column blocks of the triangular factor. Fewer, larger blocks keep the batched products efficient; more skip more
# zeros. Measured for D = 176, 4,096 positions on 2 cores (onnxruntime / OpenVINO): 4 blocks took 0.69 / 0.72 of
# the full product's time for one image and 0.80 / 1.00 for 8; 8 blocks were slower than full for 8 images.
FACTOR_BLOCKS = 4


@dataclass
class ExportResult:
    onnx_path: Path
    data_path: Path
    onnx_bytes: int
    data_bytes: int
    metadata: dict  # what the export's metadata_props hold


class ExternalData:
    """Appends tensors to one data file and returns ONNX tensors that refer to it (never held in protobuf)."""

    def __init__(self, folder: Path, name: str):
        self.name = name
        self.handle = open(folder / name, "wb")
        self.offset = 0

    def _start(self, nbytes: int) -> None:
        if nbytes >= ALIGN_BYTES and self.offset % ALIGN_BYTES:
            pad = ALIGN_BYTES - self.offset % ALIGN_BYTES
            self.handle.write(b"\0" * pad)
            self.offset += pad

    def add(self, name: str, dtype: np.dtype, shape: tuple[int, ...], blocks) -> onnx.TensorProto:
        """A tensor written from an iterable of arrays whose bytes, in order, make up the (C-order) tensor."""
        import onnx
        from onnx import helper

        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self._start(nbytes)
        start = self.offset
        for block in blocks:
            data = np.ascontiguousarray(block, dtype=dtype)
            self.handle.write(data.data)  # the array's own buffer, no copy
            self.offset += data.nbytes
        if self.offset - start != nbytes:
            raise RuntimeError(f"tensor {name}: wrote {self.offset - start} bytes, expected {nbytes}")
        tensor = onnx.TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(dtype)
        tensor.dims.extend(shape)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.name), ("offset", str(start)), ("length", str(nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    def close(self) -> None:
        self.handle.close()


# ------------------------------------------------------------------------------------------- graph
def _embedding_module(model: Padim):
    """Images (N, 3, H, W) → embeddings as ``Padim._embed`` gives them, as one module to trace: (N, P, D), or
    with tiles the extractor on the N·T tiles as one batch, then (N, T·p, D) (tile-major, per-tile Gaussians) or
    (N·T, p, D) (one shared set)."""
    import copy

    import torch

    class Embedding(torch.nn.Module):
        def __init__(self, extractor, tiler, shared: bool):
            super().__init__()
            self.extractor, self.tiler, self.shared = extractor, tiler, shared

        def forward(self, images):
            if self.tiler is None:
                return self.extractor(images)
            return self.tiler.arrange(self.extractor(self.tiler.split(images)), images.shape[0], self.shared)

    module = Embedding(model.extractor_, model.tiler_, model.tile_shared)
    return module if model.device_.type == "cpu" else copy.deepcopy(module).cpu()


def backbone_graph(model: Padim, opset: int) -> onnx.ModelProto:
    """The model's embedding (images → embeddings, see ``_embedding_module``) as ONNX, traced on the CPU."""
    from .embedders import module_graph

    return module_graph(_embedding_module(model), model.preprocessing_.output_size, opset)


def factor_column_blocks(dim: int) -> list[tuple[int, int]]:
    """The output columns [start, stop) of each of the factor's blocks: FACTOR_BLOCKS near-equal parts of D."""
    step = -(-dim // FACTOR_BLOCKS)
    return [(start, min(dim, start + step)) for start in range(0, dim, step)]


def factor_block(whitener, start: int, stop: int, dtype: np.dtype):
    """Wᵀ[:stop, start:stop] for every position, (P, stop, stop - start): the rows of W from ``start`` to ``stop``
    (all zero beyond column ``stop``), transposed for (N, stop) @ (stop, stop - start); yielded in blocks of
    positions."""
    positions, dim = whitener.shape[:2]
    step = max(1, FACTOR_BLOCK_BYTES // (dim * dim * 4))
    for first in range(0, positions, step):
        rows = as_float32(whitener[first : first + step, start:stop, :stop])
        yield rows.transpose(0, 2, 1).astype(dtype)


def as_float32(array) -> np.ndarray:
    """A NumPy float32 copy of a NumPy array or torch tensor (on any device)."""
    return array.detach().float().cpu().numpy() if is_tensor(array) else np.asarray(array, np.float32)


@dataclass
class ScoringParts:
    """What the scoring part of an export is made of: a fitted model's state, as a ``Padim`` holds it
    (``of_model``) or as a fit without torch computed it (NumPy arrays, ``fastpadim.onnx_fit``)."""

    mean: object  # (P, D)
    whitener: object  # (P, D, D): the factor, read block of positions by block
    grid: tuple[int, int]  # the frame's embedding grid
    size: tuple[int, int]  # the network's input and the map's size (height, width)
    rows_operator: np.ndarray  # (H, frame grid height): bicubic upsampling, then the blur
    columns_operator_t: np.ndarray  # (frame grid width, W)
    tiler: object = None  # a Tiler (torch), or None without tiles

    @classmethod
    def of_model(cls, model: Padim) -> ScoringParts:
        from .anomaly_map import map_operators

        size = tuple(model.preprocessing_.output_size)
        frame = model.tiler_.grid if model.tiler_ is not None else model.grid_
        return cls(model.mean_, model.whitener_, tuple(model.grid_), size,
                   *map_operators(tuple(frame), size, model.blur_sigma), model.tiler_)


def scoring_nodes(parts: ScoringParts, opset: int, store: ExternalData, fp16: bool) -> tuple[list, list]:
    """Embeddings → anomaly maps (N, H, W) and scores (N,), as in ``Padim._score_tensor``."""
    from onnx import TensorProto, helper, numpy_helper

    positions, dim = parts.mean.shape
    tiler = parts.tiler
    # distances as (N, T, h, w): the tiles' grids (T = 1 and the frame's grid without tiles)
    tiles, (h, w) = (tiler.n_tiles, tiler.tile_grid) if tiler is not None else (1, parts.grid)
    factor_dtype = np.float16 if fp16 else np.float32

    def const(name, array):
        return numpy_helper.from_array(np.asarray(array), name)

    inits = [
        # the mean stays float32 in fp16 exports too: it is small, and its rounding would be amplified by W
        store.add("padim/mean", np.float32, (positions, 1, dim), [as_float32(parts.mean)]),
        const("padim/grid_shape", np.array([-1, tiles, h, w], np.int64)),
        const("padim/reduce_axis", np.array([2], np.int64)),
        const("padim/squeeze_axis", np.array([1], np.int64)),
        const("padim/first", np.array([0], np.int64)),
        # the map's operator along each axis (bicubic, then blur): map = A_h · distances · A_wᵀ
        store.add("padim/rows_operator", np.float32, parts.rows_operator.shape, [parts.rows_operator]),
        store.add("padim/columns_operator_t", np.float32, parts.columns_operator_t.shape, [parts.columns_operator_t]),
    ]
    node = helper.make_node
    nodes = [
        # (N, P, D) → (P, N, D), the batched products' layout; the mean, stored (P, 1, D), broadcasts there
        node("Transpose", ["embeddings"], ["padim/embeddings_pnd"], perm=[1, 0, 2]),
        node("Sub", ["padim/embeddings_pnd", "padim/mean"], ["padim/centred_pnd"]),
    ]
    # ‖W (x − μ)‖² per position, block by block: whitened columns [a, b) = (x − μ)[:b] @ Wᵀ[:b, a:b]
    partial = []
    for index, (first, stop) in enumerate(factor_column_blocks(dim)):
        name = f"padim/factor{index}"
        inits.append(store.add(name, factor_dtype, (positions, stop, stop - first),
                               factor_block(parts.whitener, first, stop, factor_dtype)))
        if fp16:  # cast back once, at load time (constant input)
            nodes.append(node("Cast", [name], [f"{name}/f32"], to=TensorProto.FLOAT))
            name = f"{name}/f32"
        centred = "padim/centred_pnd"
        if stop < dim:
            inits.append(const(f"padim/stop{index}", np.array([stop], np.int64)))
            centred = f"padim/centred{index}"
            nodes.append(node("Slice", ["padim/centred_pnd", "padim/first", f"padim/stop{index}", "padim/reduce_axis"], [centred]))
        nodes += [
            node("MatMul", [centred, name], [f"padim/whitened{index}"]),
            node("Mul", [f"padim/whitened{index}", f"padim/whitened{index}"], [f"padim/squares{index}"]),
            node("ReduceSum", [f"padim/squares{index}", "padim/reduce_axis"], [f"padim/sq_dist{index}"], keepdims=0),
        ]
        partial.append(f"padim/sq_dist{index}")
    nodes += [
        node("Sum", partial, ["padim/sq_dist"]),
        node("Sqrt", ["padim/sq_dist"], ["padim/dist_pn"]),
        node("Transpose", ["padim/dist_pn"], ["padim/dist_np"], perm=[1, 0]),
        node("Reshape", ["padim/dist_np", "padim/grid_shape"], ["padim/dist_grid"]),
    ]
    grid = "padim/dist_grid"
    if tiler is not None:
        stitch_nodes, stitch_inits = stitching_nodes(tiler, grid, "padim/frame_grid", store)
        nodes, inits, grid = nodes + stitch_nodes, inits + stitch_inits, "padim/frame_grid"
    nodes += [
        # bicubic upsampling as PyTorch's and the reflection-padded blur: (N, 1, H, W)
        node("MatMul", ["padim/rows_operator", grid], ["padim/upsampled_rows"]),
        node("MatMul", ["padim/upsampled_rows", "padim/columns_operator_t"], ["padim/blurred"]),
        # clamp at 0 (bicubic may undershoot), then the map and its max
        node("Relu", ["padim/blurred"], ["padim/clamped"]),
        node("Squeeze", ["padim/clamped", "padim/squeeze_axis"], [MAP_OUTPUT]),
    ]
    if opset >= 18:
        inits.append(const("padim/map_axes", np.array([1, 2], np.int64)))
        nodes.append(node("ReduceMax", [MAP_OUTPUT, "padim/map_axes"], [SCORE_OUTPUT], keepdims=0))
    else:
        nodes.append(node("ReduceMax", [MAP_OUTPUT], [SCORE_OUTPUT], axes=[1, 2], keepdims=0))
    return nodes, inits


def stitching_nodes(tiler, source: str, target: str, store: ExternalData) -> tuple[list, list]:
    """``Tiler.stitch`` as ONNX: (N, T, h, w) tile maps → (N, 1, GH, GW), each tile split off, padded into its
    place in the frame's grid, summed, and weighted by 1 / the tiles covering each cell (the Tiler's own weight)."""
    from onnx import helper, numpy_helper

    (grid_h, grid_w), (tile_h, tile_w) = tiler.grid, tiler.tile_grid
    names = [f"padim/tile{index}" for index in range(tiler.n_tiles)]
    inits = [numpy_helper.from_array(np.ones(tiler.n_tiles, np.int64), "padim/tile_split"),
             store.add("padim/stitch_weight", np.float32, tuple(tiler.grid), [tiler.weight.cpu().numpy()])]
    nodes = [helper.make_node("Split", [source, "padim/tile_split"], names, axis=1)]
    for name, (top, left) in zip(names, tiler.origins):
        top, left = top // tiler.cell, left // tiler.cell
        pads = np.array([0, 0, top, left, 0, 0, grid_h - top - tile_h, grid_w - left - tile_w], np.int64)
        inits.append(numpy_helper.from_array(pads, f"{name}/pads"))
        nodes.append(helper.make_node("Pad", [name, f"{name}/pads"], [f"{name}/placed"]))
    nodes += [helper.make_node("Sum", [f"{name}/placed" for name in names], ["padim/tile_sum"]),
              helper.make_node("Mul", ["padim/tile_sum", "padim/stitch_weight"], [target])]
    return nodes, inits


def externalize(graph: onnx.GraphProto, store: ExternalData, fp16: bool) -> None:
    """Move the backbone's initializers to the data file; with ``fp16``, large float ones are stored in half
    precision and cast back to float32 by a node that the runtime folds at load time."""
    from onnx import TensorProto, helper, numpy_helper

    kept, casts = [], []
    for tensor in graph.initializer:
        array = numpy_helper.to_array(tensor)
        if fp16 and array.dtype == np.float32 and array.size >= FP16_MIN_ELEMENTS:
            stored = f"{tensor.name}/fp16"
            kept.append(store.add(stored, np.float16, array.shape, [array.astype(np.float16)]))
            casts.append(helper.make_node("Cast", [stored], [tensor.name], to=TensorProto.FLOAT))
        elif array.nbytes >= 1024:
            kept.append(store.add(tensor.name, array.dtype, array.shape, [array]))
        else:
            kept.append(tensor)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if casts:
        nodes = casts + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)


def export_metadata(model_meta: dict, size: tuple[int, int], opset: int, fp16: bool, data_name: str,
                    calibration_images: int | None = None) -> dict:
    """The model's metadata (``Padim.to_metadata``) and the export's own; ``calibration_images``: with an int8
    backbone, how many good images calibrated it (None: float32)."""
    meta = dict(model_meta)
    f32, int8 = BACKBONE_PRECISIONS
    meta["export"] = {
        "format_version": EXPORT_FORMAT_VERSION,
        "opset": opset,
        "weights_dtype": "float16" if fp16 else "float32",
        "backbone_precision": f32 if calibration_images is None else int8,
        **({} if calibration_images is None else {"calibration_images": calibration_images}),
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, *size],
                  "description": "RGB, preprocessed as in 'preprocessing' (resize, crop, (x/255 - mean)/std), NCHW float32"},
        "outputs": {MAP_OUTPUT: ["batch", *size], SCORE_OUTPUT: ["batch"]},
        "data_file": data_name,
    }
    return meta


def check_export_target(path: Path, opset: int) -> None:
    if opset not in OPSETS:
        raise FastpadimError(f"--opset must be between {OPSETS.start} and {OPSETS.stop - 1}, got {opset}")
    if path.suffix.lower() != ".onnx":
        raise FastpadimError(f"{path}: the export must be an .onnx file (its tensors go beside it, in {path.name}.data)")
    check_writable_file(path)


def check_int8(fp16: bool) -> None:
    """An int8 backbone excludes fp16 storage, and needs NNCF: refused before any slow work."""
    from .quantize import check_installed

    if fp16:
        raise FastpadimError("--int8 and --fp16 exclude each other (an int8 backbone's weights are 8-bit already); "
                             "choose one")
    check_installed()


def calibration_batches(model: Padim, images):
    """Good images (paths, arrays, a folder, a glob, as ``Padim.fit`` takes them) preprocessed as the model
    preprocesses its inputs: float32 (N, 3, H, W) batches of the readable ones."""
    from .images import iter_batches, single_or_many, stack_arrays
    from .sources import expand

    images, _ = expand(images)
    for batch in iter_batches(single_or_many(images), model.preprocessing_, model.batch_size, model.workers):
        if any(item.array is not None for item in batch):
            yield stack_arrays(batch)


def int8_backbone(model: Padim, proto: onnx.ModelProto, images) -> tuple[onnx.ModelProto, int]:
    """The backbone graph quantised to int8 (see ``fastpadim.quantize``) and the count of calibration images."""
    from .quantize import quantize_backbone

    batches = list(calibration_batches(model, images))
    return quantize_backbone(proto, batches), sum(len(batch) for batch in batches)


def export_onnx(model: Padim, path: str | os.PathLike, fp16: bool = False, opset: int = DEFAULT_OPSET,
                int8_images=None) -> ExportResult:
    """Write ``path`` (.onnx graph) and ``path.data`` (its tensors) for a fitted model; all or nothing.
    ``int8_images``: good images (as ``Padim.fit`` takes them) to calibrate an int8 backbone on (opt-in, lossy;
    None: float32)."""
    model.check_fitted()
    path = Path(path)
    check_export_target(path, opset)
    if int8_images is not None:
        check_int8(fp16)

    def backbone():
        proto, calibrated = backbone_graph(model, opset), None
        if int8_images is not None:
            proto, calibrated = int8_backbone(model, proto, int8_images)
        return proto, calibrated

    return write_export(path, backbone, ScoringParts.of_model(model), model.to_metadata(), fp16, opset)


def write_export(path: Path, backbone, parts: ScoringParts, model_meta: dict, fp16: bool = False,
                 opset: int = DEFAULT_OPSET) -> ExportResult:
    """The export of ``backbone()`` (→ the network's ONNX graph, images → embeddings, and its count of int8
    calibration images or None) followed by the scoring part built from ``parts``, with the model's metadata
    ``model_meta``: ``path`` and ``path.data`` written whole or not at all. Torch-free itself (the graph may come
    from a cache: ``fastpadim.onnx_fit``)."""
    import onnx
    from onnx import TensorProto, helper

    from . import __version__

    folder = path.parent if str(path.parent) else Path(".")
    data_name = f"{path.name}.data"
    size = parts.size
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder))
    except OSError as exc:
        raise FastpadimError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        proto, calibrated = backbone()
        graph = proto.graph
        store = ExternalData(work, data_name)
        try:
            externalize(graph, store, fp16)
            nodes, inits = scoring_nodes(parts, opset, store, fp16)
        finally:
            store.close()
        graph.node.extend(nodes)
        graph.initializer.extend(inits)
        del graph.output[:]
        graph.output.extend([
            helper.make_tensor_value_info(MAP_OUTPUT, TensorProto.FLOAT, ["batch", *size]),
            helper.make_tensor_value_info(SCORE_OUTPUT, TensorProto.FLOAT, ["batch"]),
        ])
        graph.name = "fastpadim"
        proto.ir_version = helper.find_min_ir_version_for(list(proto.opset_import))
        proto.producer_name, proto.producer_version = "fastpadim", __version__
        proto.doc_string = "PaDiM anomaly maps and image scores; see metadata_props['fastpadim']"
        del proto.metadata_props[:]
        meta = check_metadata(export_metadata(model_meta, size, opset, fp16, data_name, calibrated), path)  # what the runtime will accept
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(meta)
        onnx.save_model(proto, str(work / path.name))
        onnx.checker.check_model(str(work / path.name))
        # data first: the old .onnx never points at a missing file, and a failure leaves the old pair whole
        os.replace(work / data_name, folder / data_name)
        os.replace(work / path.name, path)
    except OSError as exc:
        raise FastpadimError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ExportResult(path, folder / data_name, path.stat().st_size, (folder / data_name).stat().st_size, meta)
