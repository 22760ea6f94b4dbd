"""The network that turns images into embeddings, run by the engine a ``Padim`` was asked for.

``engine="torch"`` runs the feature extractor itself. ``"onnxruntime"`` and ``"openvino"`` run its ONNX graph,
traced once when the model is built (the input size fixed, the batch free; 0.6 s for the default backbone), in
float32: every embedding of fit, ``partial_fit`` and scoring then comes from that engine, and the statistics and
distances stay where they were. ``"auto"`` times each installed engine on probe inputs and keeps the fastest
whose embeddings match the extractor's within 1e-4 of their largest magnitude (what it measured is in
``Padim.engine_choice_``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import FastpadimError
from .timing import best_of
from .onnx_runtime import DEFAULT_OPSET, EMBEDDINGS_OUTPUT as EMBEDDINGS, ENGINE_CHOICES as ENGINES, ENGINES as ONNX_ENGINES, INPUT_NAME, installed_engines  # noqa: F401 - ENGINES: what Padim checks its engine against
AUTO_TOLERANCE = 1e-4  # relative to the largest embedding magnitude of the probe
PROBE_SEED = 20240611


class _PaddedConv(torch.autograd.Function):
    """Zero padding (left, right, top, bottom), then a convolution; traced to ONNX as one Conv with those pads."""

    @staticmethod
    def forward(ctx, x, weight, bias, pads, stride, dilation, groups):
        return F.conv2d(F.pad(x, pads), weight, bias, stride, 0, dilation, groups)

    @staticmethod
    def symbolic(g, x, weight, bias, pads, stride, dilation, groups):
        left, right, top, bottom = pads
        return g.op("Conv", x, weight, bias, pads_i=[top, left, bottom, right], strides_i=list(stride),
                    dilations_i=list(dilation), group_i=groups, kernel_shape_i=list(weight.type().sizes()[2:]))


class FixedPaddingConv(torch.nn.Module):
    """A TensorFlow-"same" convolution (timm's ``Conv2dSame``) with its padding fixed for one input size."""

    def __init__(self, conv: torch.nn.Conv2d, pads: tuple[int, int, int, int]):
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias if conv.bias is not None else torch.nn.Parameter(torch.zeros(conv.out_channels))
        self.pads, self.stride, self.dilation, self.groups = pads, conv.stride, conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _PaddedConv.apply(x, self.weight, self.bias, self.pads, self.stride, self.dilation, self.groups)


def fixed_padding(module: torch.nn.Module, size: tuple[int, int]) -> torch.nn.Module:
    """``module`` with its "same" convolutions' padding computed once for inputs (N, 3, *size) (a copy; the module
    itself when it has none). timm computes that padding from the input's shape at every call, which the ONNX
    tracer records as shape arithmetic: the engines then pad as a separate step. Fixed, the padding is a constant
    in the convolution itself (ONNX Conv takes uneven pads): no separate padding step (the default backbone's
    graph alone: 8 images 14-18 % faster)."""
    import copy

    from timm.layers import Conv2dSame
    from timm.layers.padding import get_same_padding

    names = [name for name, sub in module.named_modules() if isinstance(sub, Conv2dSame)]
    if not names:
        return module
    module = copy.deepcopy(module)
    inputs = {}
    hooks = [module.get_submodule(name).register_forward_pre_hook(
        lambda _, args, name=name: inputs.__setitem__(name, tuple(args[0].shape[-2:]))) for name in names]
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, *size))
    finally:
        for hook in hooks:
            hook.remove()
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = module.get_submodule(parent)
        conv = getattr(owner, child)
        pad_h, pad_w = (get_same_padding(inputs[name][axis], conv.kernel_size[axis], conv.stride[axis],
                                         conv.dilation[axis]) for axis in (0, 1))
        setattr(owner, child, FixedPaddingConv(conv, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)))
    return module


def module_graph(module: torch.nn.Module, size: tuple[int, int], opset: int = DEFAULT_OPSET):
    """A CPU module from images (N, 3, *size) to embeddings as an ONNX ModelProto, the batch free (traced once,
    weights folded in, "same" padding fixed for ``size``)."""
    import io
    import warnings

    import onnx

    module = fixed_padding(module, size)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's tracer and deprecation notes say nothing to users
        torch.onnx.export(
            module.eval(), (torch.zeros(1, 3, *size),), buffer,
            dynamo=False, opset_version=opset, input_names=[INPUT_NAME], output_names=[EMBEDDINGS],
            dynamic_axes={INPUT_NAME: {0: "batch"}, EMBEDDINGS: {0: "batch"}}, do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue())


class OnnxEmbedder:
    """The extractor's ONNX graph for inputs of ``size``, run by ``engine`` in float32: a callable from images
    (B, 3, H, W) to embeddings, as the extractor is, on the CPU."""

    def __init__(self, extractor: torch.nn.Module, size: tuple[int, int], engine: str, threads: int | None = None):
        from .onnx_runtime import OnnxRuntimeSession, OpenVinoSession

        if engine not in installed_engines():
            extra = "runtime" if engine == "onnxruntime" else "openvino"
            raise FastpadimError(f"engine {engine} is not installed: pip install 'fastpadim[{extra}]'")
        self.engine, self.size = engine, tuple(size)
        graph = module_graph(extractor, self.size)
        session = OnnxRuntimeSession if engine == "onnxruntime" else OpenVinoSession
        with tempfile.TemporaryDirectory(prefix="fastpadim-embedder-") as folder:
            path = Path(folder) / "embedder.onnx"  # both engines read a file; it is gone once they hold the graph
            path.write_bytes(graph.SerializeToString())
            del graph
            options = {"spin": False} if engine == "onnxruntime" else {}
            self.session = session(path, "cpu", threads, "f32", outputs=(EMBEDDINGS,), **options)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(batch)[0])

    def __repr__(self) -> str:
        return f"OnnxEmbedder({self.engine}, {self.size[0]}x{self.size[1]})"


def probe(size: tuple[int, int], count: int) -> torch.Tensor:
    """``count`` deterministic normalised inputs of ``size``: smooth structure plus noise, like a preprocessed image."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    coarse = torch.randn(count, 3, max(1, size[0] // 16), max(1, size[1] // 16), generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    return smooth + 0.3 * torch.randn(count, 3, *size, generator=generator)


def _best_seconds(embedder, inputs: torch.Tensor) -> tuple[float, torch.Tensor]:
    def call():
        with torch.inference_mode():
            return embedder(inputs)

    return best_of(call)


def build(extractor: torch.nn.Module, size: tuple[int, int], engine: str, device: torch.device,
          probe_count: int) -> tuple[object, str, dict | None]:
    """The embedder for ``engine`` ("auto": measured, see the module's docstring) on ``device``: (embedder, the
    engine it runs on, what auto measured or None); ``engine`` is one of ``ENGINES`` (``Padim`` checks it)."""
    if engine == "torch":
        return extractor, "torch", None
    if device.type != "cpu":
        if engine == "auto":
            return extractor, "torch", None  # on a GPU the PyTorch engine is the one that uses it
        raise FastpadimError(f"engine {engine} computes the embeddings on the CPU here; use --device cpu or "
                             "--engine torch for the GPU")
    if engine in ONNX_ENGINES:
        return OnnxEmbedder(extractor, size, engine), engine, None
    inputs = probe(size, probe_count)
    seconds, expected = _best_seconds(extractor, inputs)
    scale = float(expected.abs().max()) or 1.0
    candidates = {"torch": {"seconds": seconds, "max_relative_difference": 0.0, "qualified": True}}
    embedders = {"torch": extractor}
    for name in installed_engines():
        try:
            embedder = OnnxEmbedder(extractor, size, name)
            seconds, got = _best_seconds(embedder, inputs)
        except FastpadimError as exc:
            candidates[name] = {"seconds": None, "qualified": False, "error": str(exc)}
            continue
        difference = float((got - expected).abs().max()) / scale
        qualified = bool(np.isfinite(difference)) and difference <= AUTO_TOLERANCE
        candidates[name] = {"seconds": seconds, "max_relative_difference": difference, "qualified": qualified}
        if qualified:
            embedders[name] = embedder
    chosen = min(embedders, key=lambda name: candidates[name]["seconds"])
    return embedders[chosen], chosen, {"engine": chosen, "candidates": candidates}
