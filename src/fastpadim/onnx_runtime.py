"""``OnnxPadim``: an ONNX export (``fastpadim export``) scored by onnxruntime or OpenVINO, without PyTorch.

It gives the same ``predict``/``score``/``iter_scored`` outputs as ``Padim``: decoding and preprocessing are
the shared NumPy code of ``fastpadim.images``, the scoring API the shared ``ScoringMixin``. The threshold and
preprocessing come from the file's metadata (``metadata_props["fastpadim"]``), which ``write_metadata`` and
``OnnxPadim.save_metadata`` change in place without touching the graph or its data file.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

from .errors import FastpadimError
from .files import folder_of
from .images import Preprocessing
from .metadata import refuse_field, shown, validate
from .results import ScoringMixin
from .sizes import format_size, inputs_per_call

METADATA_KEY = "fastpadim"
# 2: the factor as triangular column blocks and the map as two matrix products (1: packed factor, Resize and Conv;
# still read: the runtime runs whatever graph the file holds)
EXPORT_FORMAT_VERSION = 2
INPUT_NAME = "images"
MAP_OUTPUT = "anomaly_map"
SCORE_OUTPUT = "score"
EMBEDDINGS_OUTPUT = "embeddings"  # of a network graph alone (fit through an engine)
ENGINES = ("onnxruntime", "openvino")
ENGINE_CHOICES = ("torch", *ENGINES, "auto")  # what --engine takes (fastpadim.embedders, fastpadim.engines)
OPSETS = range(17, 21)  # what ``fastpadim export`` writes (PyTorch's TorchScript-based exporter goes up to 20)
DEFAULT_OPSET = 17  # what fastpadim exports (PyTorch's TorchScript-based exporter goes up to 20)
WEIGHTS_DTYPES = ("float32", "float16")
# The backbone part of an export: float32, or int8 (``fastpadim export --int8``, fastpadim.quantize); exports
# older than the field have a float32 backbone.
BACKBONE_PRECISIONS = ("f32", "int8")
# Inference precision. f32 everywhere by default: OpenVINO's CPU plugin would otherwise pick bf16 on CPUs with
# native bf16 (AVX-512 BF16, AMX), which moved bottle scores by 0.7 % to 68 %. Lower precisions are opt-in,
# OpenVINO only, and only where the CPU has them natively (OpenVINO would silently run f32 otherwise).
PRECISIONS = ("f32", "bf16", "f16")
DEFAULT_PRECISION = "f32"
_OPENVINO_CAPABILITY = {"bf16": "BF16", "f16": "FP16"}  # core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
SCAN_BLOCK_BYTES = 16 * 1024 * 1024  # external tensors are checked for NaN/Inf this many bytes at a time
_MAX_NAME = 255


def _onnx_types():
    """ONNX element types: item sizes (for the external data lengths) and the float ones checked for NaN/Inf."""
    from onnx import TensorProto as T

    sizes = {T.FLOAT: 4, T.FLOAT16: 2, T.BFLOAT16: 2, T.DOUBLE: 8, T.INT64: 8, T.INT32: 4, T.INT16: 2, T.INT8: 1,
             T.UINT64: 8, T.UINT32: 4, T.UINT16: 2, T.UINT8: 1, T.BOOL: 1}
    # bfloat16 has no NumPy type: its bits are read as uint16 (exponent all ones = NaN or Inf)
    floats = {T.FLOAT: np.float32, T.FLOAT16: np.float16, T.DOUBLE: np.float64, T.BFLOAT16: np.uint16}
    return sizes, floats


def installed_engines() -> list[str]:
    """The ONNX engines whose package is importable here (found, not imported)."""
    from importlib.util import find_spec

    found = []
    for engine in ENGINES:
        try:
            if find_spec(engine) is not None:
                found.append(engine)
        except (ImportError, ValueError):
            pass
    return found


def _all_finite(values: np.ndarray) -> bool:
    if values.dtype == np.uint16:  # bfloat16 bits
        return not np.any((values & 0x7F80) == 0x7F80)
    return bool(np.isfinite(values).all())


def plain_file_name(name) -> bool:
    """A bare file name: no folder part, no '..', nothing absolute (what an export's data file must be)."""
    return (isinstance(name, str) and 0 < len(name) <= _MAX_NAME and name not in (".", "..")
            and not any(char in "/\\:" or ord(char) < 32 for char in name))


def _beside(path: Path, name, what: str) -> Path:
    """``name`` as a file beside the model ``path``; refused if it is a path or a link out of that folder."""
    if not plain_file_name(name):
        raise FastpadimError(f"{path}: {what} {shown(name)} is not a plain file name; an export's data file must lie "
                             "beside the .onnx file (export the model again)")
    candidate = folder_of(path) / name
    try:
        outside = candidate.resolve().parent != folder_of(path).resolve()
    except (OSError, RuntimeError):  # a link loop
        outside = True
    if outside:
        raise FastpadimError(f"{path}: {what} {name} is a link out of the model's folder; put the data file itself "
                             "beside the .onnx file")
    return candidate


# "Exception from src/inference/src/cpp/core.cpp:84:", "Check 'false' failed at src/.../frontend.cpp:47:"
_OPENVINO_LOCATION = re.compile(r"^(?:Exception from \S+?:\d+:|.*?\bfailed at \S+?:\d+:)\s*")


def openvino_reason(exc: BaseException, limit: int = 300) -> str:
    """The reason in an OpenVINO exception, in one line. Its text starts with source locations
    ("Exception from src/inference/src/cpp/core.cpp:84:", "Check 'false' failed at ....cpp:151:"), and the
    cause comes after them, often followed by a summary: keep the last cause line and the summary."""
    lines = [_OPENVINO_LOCATION.sub("", line.strip(), count=1) for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return type(exc).__name__
    if "Summary:" in lines:
        at = lines.index("Summary:")
        details = [line for line in lines[:at] if not line.endswith(":")]
        summary = "; ".join(line.lstrip("- ") for line in lines[at + 1 :])
        if details and summary:
            reason = f"{details[-1]} ({summary})"
        else:
            reason = summary or (details[-1] if details else type(exc).__name__)
    else:
        reason = lines[-1].lstrip("- ")
    return reason if len(reason) <= limit else reason[: limit - 1] + "…"


def _load_graph(path: Path):
    """The ONNX model without its external data (small), or one clear error."""
    try:
        import onnx
    except ImportError:
        raise FastpadimError("reading ONNX files needs the 'onnx' package: pip install 'fastpadim[runtime]'") from None
    if not path.exists():
        raise FastpadimError(f"{path}: no such model file")
    if path.is_dir():
        raise FastpadimError(f"{path}: is a folder, not a model file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except PermissionError:
        raise FastpadimError(f"{path}: permission denied") from None
    except Exception as exc:  # noqa: BLE001 - protobuf reports corrupt files in many ways
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FastpadimError(f"{path}: not an ONNX model, or truncated ({reason})") from None


def check_metadata(meta, path: str | os.PathLike = "model") -> dict:
    """Check an ONNX export's metadata: the shared ``.padim`` schema (``fastpadim.metadata.validate``) and the
    ``export`` section (version, opset, weights precision, input and outputs consistent with the preprocessing,
    data file a plain name). Returns ``meta``, or raises FastpadimError naming the first bad field."""
    if not isinstance(meta, dict) or meta.get("format") != "fastpadim" or not isinstance(meta.get("export"), dict):
        raise FastpadimError(f"{path}: its fastpadim metadata does not describe an ONNX export")
    ex = meta["export"]
    version = ex.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise FastpadimError(f"{path}: its fastpadim metadata has no valid export version")
    if version > EXPORT_FORMAT_VERSION:
        raise FastpadimError(f"{path}: export format {version} is newer than this fastpadim reads ({EXPORT_FORMAT_VERSION}); upgrade fastpadim")
    validate(meta, path)
    opset = ex.get("opset")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in OPSETS:
        refuse_field(path, "export.opset", f"must be an integer from {OPSETS.start} to {OPSETS.stop - 1}, got {shown(opset)}")
    if ex.get("weights_dtype") not in WEIGHTS_DTYPES:
        refuse_field(path, "export.weights_dtype", f"must be one of {', '.join(WEIGHTS_DTYPES)}, got {shown(ex.get('weights_dtype'))}")
    _check_backbone_precision(ex, path)
    # the graph's input is the preprocessing's output (height, width): both bounded by validate's size limits
    size = Preprocessing.from_dict(meta["preprocessing"]).output_size
    height, width = size
    inputs = ex.get("input")
    if not isinstance(inputs, dict) or inputs.get("name") != INPUT_NAME:
        refuse_field(path, "export.input", f"must describe the graph input {INPUT_NAME!r}, got {shown(inputs)}")
    if inputs.get("shape") != ["batch", 3, height, width]:
        refuse_field(path, "export.input.shape", f"must be ['batch', 3, {height}, {width}] (the preprocessing gives "
                                                 f"{format_size(size)} px images), got {shown(inputs.get('shape'))}")
    outputs = {MAP_OUTPUT: ["batch", height, width], SCORE_OUTPUT: ["batch"]}
    if ex.get("outputs") != outputs:
        refuse_field(path, "export.outputs", f"must be {outputs}, got {shown(ex.get('outputs'))}")
    if not plain_file_name(ex.get("data_file")):
        refuse_field(path, "export.data_file", f"must be a plain file name beside the .onnx file, got {shown(ex.get('data_file'))}")
    return meta


def _check_backbone_precision(ex: dict, path) -> None:
    """``export.backbone_precision`` (absent: f32) and, for int8, its count of calibration images."""
    precision = ex.get("backbone_precision", BACKBONE_PRECISIONS[0])
    if precision not in BACKBONE_PRECISIONS:
        refuse_field(path, "export.backbone_precision", f"must be one of {', '.join(BACKBONE_PRECISIONS)}, got {shown(precision)}")
    count = ex.get("calibration_images")
    if precision == "int8" and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        refuse_field(path, "export.calibration_images", f"must be a positive integer for an int8 backbone, got {shown(count)}")


def _metadata_of(path: Path, proto) -> dict:
    props = {entry.key: entry.value for entry in proto.metadata_props}
    raw = props.get(METADATA_KEY)
    if raw is None:
        raise FastpadimError(f"{path}: an ONNX model, but not one exported by fastpadim (no fastpadim metadata)")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        raise FastpadimError(f"{path}: its fastpadim metadata is not valid JSON") from None
    check_metadata(meta, path)
    _beside(path, meta["export"]["data_file"], "its data file")  # no link out of the folder either
    return meta


def _tensors(graph):
    """Every tensor a graph holds: initializers (sparse ones too) and node attributes, subgraphs included."""
    from onnx import AttributeProto

    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == AttributeProto.TENSOR:
                yield attribute.t
            elif attribute.type == AttributeProto.TENSORS:
                yield from attribute.tensors
            elif attribute.type == AttributeProto.GRAPH:
                yield from _tensors(attribute.g)
            elif attribute.type == AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from _tensors(sub)


def _check_external_data(path: Path, proto) -> None:
    """Every external tensor must lie inside a data file beside the model (a plain file name, no link out of
    the folder) and every float tensor must be finite: a missing, cut, misplaced or damaged data file, or
    NaN/Inf weights, get one clear line here instead of a runtime's error or NaN scores later."""
    from onnx import TensorProto, numpy_helper

    item_sizes, float_types = _onnx_types()
    files: dict[str, tuple[Path, int]] = {}
    external = []
    for tensor in _tensors(proto.graph):
        if tensor.data_location != TensorProto.EXTERNAL:
            if tensor.data_type in float_types and tensor.data_type != TensorProto.BFLOAT16:
                try:
                    values = numpy_helper.to_array(tensor)
                except Exception:  # noqa: BLE001 - its bytes do not fit its shape
                    raise FastpadimError(f"{path}: tensor {shown(tensor.name)} is damaged (its data does not fit its shape "
                                         f"{shown(list(tensor.dims))}): export the model again") from None
                if not _all_finite(values):
                    raise FastpadimError(f"{path}: tensor {shown(tensor.name)} holds NaN or infinite values; the file is "
                                         "damaged or was altered: export the model again")
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        data_path = _beside(path, location, f"tensor {shown(tensor.name)}: its data file")
        if location not in files:
            if not data_path.is_file():
                raise FastpadimError(f"{path}: its data file {location} is missing (keep it beside the .onnx file)")
            files[location] = (data_path, data_path.stat().st_size)
        size = files[location][1]
        if any(dim < 0 for dim in tensor.dims):
            raise FastpadimError(f"{path}: tensor {shown(tensor.name)} has a negative dimension {shown(list(tensor.dims))}")
        needed = int(np.prod([int(dim) for dim in tensor.dims], dtype=object)) * item_sizes[tensor.data_type] \
            if tensor.data_type in item_sizes else None
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else (needed if needed is not None else size - offset)
        except ValueError:
            raise FastpadimError(f"{path}: tensor {shown(tensor.name)}: its data offset or length is not a number") from None
        if offset < 0 or length < 0:
            raise FastpadimError(f"{path}: tensor {shown(tensor.name)}: negative data offset or length ({offset}, {length})")
        if needed is not None and length != needed:
            raise FastpadimError(f"{path}: tensor {shown(tensor.name)} of shape {shown(list(tensor.dims))} needs {needed} bytes, "
                                 f"but its entry gives {length}; the file is damaged: export the model again")
        end = offset + length
        if end > size:
            raise FastpadimError(f"{path}: its data file {location} is truncated ({size} bytes, needs {end})")
        if tensor.data_type in float_types:
            external.append((tensor.name, location, offset, length, float_types[tensor.data_type]))
    for name, location, offset, length, dtype in external:
        if not _finite_in_file(files[location][0], offset, length, np.dtype(dtype)):
            raise FastpadimError(f"{path}: tensor {shown(name)} in {location} holds NaN or infinite values; the file is "
                                 "damaged or was altered: export the model again")


def _finite_in_file(data_path: Path, offset: int, length: int, dtype: np.dtype) -> bool:
    """Whether ``length`` bytes at ``offset`` hold only finite numbers, read through a memory map one block at a
    time (each block unmapped before the next), so a data file of any size costs one block of memory."""
    step = SCAN_BLOCK_BYTES - SCAN_BLOCK_BYTES % dtype.itemsize
    with open(data_path, "rb") as handle:
        for start in range(0, length, step):
            count = min(step, length - start) // dtype.itemsize
            if count == 0:
                continue
            block = np.memmap(handle, dtype=dtype, mode="r", offset=offset + start, shape=(count,))
            finite = _all_finite(block)
            del block  # unmapped here (the last reference), before the next block is mapped
            if not finite:
                return False
    return True


def read_metadata(path: str | os.PathLike) -> dict:
    """The fastpadim metadata of an ONNX export (the .padim metadata plus an ``export`` section)."""
    path = Path(path)
    return _metadata_of(path, _load_graph(path))


def write_metadata(path: str | os.PathLike, meta: dict) -> None:
    """Replace an export's fastpadim metadata (threshold, preprocessing); the graph and data file are kept."""
    import onnx

    from .files import atomic_write

    path = Path(path)
    proto = _load_graph(path)
    current = _metadata_of(path, proto)  # only fastpadim exports are edited
    if not isinstance(meta, dict) or meta.get("format") != "fastpadim" or not isinstance(meta.get("export"), dict):
        raise FastpadimError("new metadata must be a fastpadim export's metadata dict (read it with read_metadata)")
    if meta["export"] != current["export"]:
        raise FastpadimError(f"{path}: the metadata's 'export' section describes the graph and cannot be edited; "
                             "export the model again instead")
    check_metadata(meta, path)  # a bad edit (NaN threshold, std 0, ...) fails here, not when the model is next used
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            entry.value = json.dumps(meta)
    # tensors stay external: only the small graph file is rewritten, atomically
    atomic_write(path, lambda tmp: onnx.save_model(proto, tmp))


def write_threshold(path: str | os.PathLike, threshold: float | None) -> None:
    """Set by hand (target "manual"), or with None remove, the image threshold stored in an ONNX export."""
    from .targets import manual_threshold

    meta = read_metadata(path)
    meta["threshold"] = manual_threshold(meta["threshold"], threshold, meta["n_train_images"])
    write_metadata(path, meta)


# ---------------------------------------------------------------------------------------- engines
class _StackT(ctypes.Structure):
    """POSIX ``stack_t`` (sigaltstack): its fields' order differs between Linux and macOS."""
    _fields_ = ([("sp", ctypes.c_void_p), ("size", ctypes.c_size_t), ("flags", ctypes.c_int)] if sys.platform == "darwin"
                else [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)])


def _sigaltstack():
    """libc's sigaltstack, or None where there is none (Windows)."""
    if os.name != "posix":
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).sigaltstack
    except (OSError, AttributeError):
        return None


_SIGALTSTACK = _sigaltstack()


@contextlib.contextmanager
def signal_stack_kept():
    """The calling thread's alternate signal stack as it was before an OpenVINO call. OpenVINO's CPU plugin installs
    a signal stack of its own when it compiles a model and, when the model is freed, puts back the one it found,
    which may belong to another model freed before it: the next signal (SIGTERM, Ctrl+C) is then delivered on freed
    memory and the process dies of SIGSEGV, with no traceback. Python's own stack, put back after each call, stays
    valid."""
    if _SIGALTSTACK is None:
        yield
        return
    before = _StackT()
    _SIGALTSTACK(None, ctypes.byref(before))
    try:
        yield
    finally:
        if not before.flags & 1:  # SS_ONSTACK: never switch stacks while running on the alternate one
            _SIGALTSTACK(ctypes.byref(before), None)


class OnnxRuntimeSession:
    """An ONNX graph run by onnxruntime, in float32 (``precision`` is always "f32"; OnnxPadim refuses any other);
    ``run`` gives the ``outputs`` named, in that order."""

    def __init__(self, path: Path, device: str, threads: int | None, precision: str,
                 outputs: tuple[str, ...] = (SCORE_OUTPUT, MAP_OUTPUT), spin: bool = True):
        try:
            import onnxruntime as ort
        except ImportError:
            raise FastpadimError("onnxruntime is not installed: pip install 'fastpadim[runtime]'") from None
        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise FastpadimError("--device cuda was asked for, but this onnxruntime has no CUDA provider")
        use_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in available
        # float32 on the GPU too: no TF32 (10-bit mantissa) matrix products, which onnxruntime allows by default
        providers = ([("CUDAExecutionProvider", {"use_tf32": "0"})] if use_cuda else []) + ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: the user sees our one-line messages
        if threads:
            options.intra_op_num_threads = threads
        if not spin:
            # idle threads sleep instead of spinning: another computation (fit's statistics) shares the cores
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise FastpadimError(f"{path}: onnxruntime cannot load it ({reason})") from None
        self.device = "cuda" if use_cuda else "cpu"
        self.precision = precision
        self.outputs = list(outputs)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(self.session.run(self.outputs, {INPUT_NAME: batch}))


def openvino_compile_config(precision: str, threads: int | None = None) -> dict:
    """The CPU plugin's settings for ``precision``: the inference precision always set explicitly (left unset,
    the plugin runs bf16 on CPUs with native bf16), and for f32 the ACCURACY mode (no dynamic quantization)."""
    config = {"INFERENCE_PRECISION_HINT": precision,
              "EXECUTION_MODE_HINT": "ACCURACY" if precision == "f32" else "PERFORMANCE"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


def openvino_capabilities() -> list[str]:
    """What OpenVINO's CPU plugin computes natively here (e.g. FP32, BF16, FP16, INT8)."""
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


class OpenVinoSession:
    """An ONNX graph compiled by OpenVINO's CPU plugin at the asked precision (``precision`` is what the compiled
    model reports); ``run`` gives the ``outputs`` named, in that order."""

    def __init__(self, path: Path, device: str, threads: int | None, precision: str,
                 outputs: tuple[str, ...] = (SCORE_OUTPUT, MAP_OUTPUT)):
        try:
            import openvino as ov
        except ImportError:
            raise FastpadimError("OpenVINO is not installed: pip install 'fastpadim[openvino]'") from None
        if device not in ("auto", "cpu"):
            raise FastpadimError(f"the OpenVINO engine runs on the CPU here; --device {device} is not supported")
        core = ov.Core()
        if precision in _OPENVINO_CAPABILITY:
            capabilities = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
            if _OPENVINO_CAPABILITY[precision] not in capabilities:
                raise FastpadimError(
                    f"precision {precision} needs a CPU with native {precision} arithmetic, and this one has none "
                    f"(OpenVINO: {', '.join(capabilities)}); use the default f32"
                )
        try:
            with signal_stack_kept():
                self.compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                                   openvino_compile_config(precision, threads))
        except Exception as exc:  # noqa: BLE001
            raise FastpadimError(f"{path}: OpenVINO cannot load it ({openvino_reason(exc)})") from None
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if self.precision != precision:  # never run one precision under another's name
            raise FastpadimError(f"{path}: OpenVINO compiled it in {self.precision}, not the {precision} asked for; "
                                 "scores would not be what was asked for (use the default f32)")
        self.request = self.compiled.create_infer_request()
        self.ports = [self.compiled.output(name) for name in outputs]
        self.device = "cpu"

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        with signal_stack_kept():
            results = self.request.infer({INPUT_NAME: batch})
        return tuple(np.array(results[port]) for port in self.ports)

    def __del__(self):
        # freeing the compiled model puts back a signal stack (see signal_stack_kept): keep this thread's own
        with signal_stack_kept():
            self.__dict__.pop("ports", None)
            self.__dict__.pop("request", None)
            self.__dict__.pop("compiled", None)


# ------------------------------------------------------------------------------------------ model
class OnnxPadim(ScoringMixin):
    """A PaDiM model exported to ONNX, scored without PyTorch; the same outputs as ``Padim``.

    ``engine``: "onnxruntime" or "openvino". ``precision``: the arithmetic, "f32" (the default, on every engine
    and CPU); OpenVINO also takes "bf16" or "f16", opt-in and only on a CPU that has them natively (faster,
    but scores move: on bottle by 0.7 % to 68 % in bf16). ``self.precision`` is the precision the engine
    actually compiled (read back from OpenVINO's compiled model). Attributes as on ``Padim``: ``threshold_``,
    ``threshold_target_``, ``threshold_extrapolated_``, ``calibration_`` (the good scores behind the threshold:
    the same ``false_alarm_probability`` as the .padim), ``history_``, ``preprocessing_``, ``false_alarm_rate``,
    ``n_samples_seen_``, ``metadata_`` (the stored metadata), ``batch_size``, ``workers``. ``backbone_precision``:
    "f32", or "int8" for an export with a quantised backbone (``fastpadim export --int8``).
    """

    def __init__(self, path: str | os.PathLike, engine: str = "onnxruntime", device: str = "auto",
                 batch_size: int = 32, workers: int = 2, threads: int | None = None, precision: str | None = None):
        if engine not in ENGINES:
            raise FastpadimError(f"unknown engine {engine!r} (use {' or '.join(ENGINES)})")
        if device not in ("auto", "cpu", "cuda"):
            raise FastpadimError(f"unknown device {device!r} (use auto, cpu or cuda)")
        precision = DEFAULT_PRECISION if precision is None else precision
        if precision not in PRECISIONS:
            raise FastpadimError(f"unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
        if engine == "onnxruntime" and precision != "f32":
            raise FastpadimError(f"precision {precision} runs on the OpenVINO engine only (--engine openvino); "
                                 "onnxruntime computes in f32")
        self.path = Path(path)
        proto = _load_graph(self.path)
        self.metadata_ = _metadata_of(self.path, proto)
        _check_external_data(self.path, proto)
        del proto
        meta = self.metadata_
        self.preprocessing_ = Preprocessing.from_dict(meta["preprocessing"])  # its size matches the graph (checked)
        self.n_samples_seen_ = meta["n_train_images"]
        self.false_alarm_rate = meta["threshold"]["false_alarm_rate"]
        # as Padim.load: the same false-alarm probabilities as the .padim it came from
        self.install_threshold_metadata(meta)
        self.backbone = meta["backbone"]["name"]
        self.backbone_precision = meta["export"].get("backbone_precision", BACKBONE_PRECISIONS[0])
        self.batch_size = batch_size
        self.workers = workers
        self.skipped_: list[tuple[str, str]] = []
        self.engine = engine
        runner = OnnxRuntimeSession if engine == "onnxruntime" else OpenVinoSession
        self._runner = runner(self.path, device, threads, precision)
        self.device = self._runner.device
        self.precision = self._runner.precision

    def run_batch(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed images (B, 3, H, W) → image scores (B,) and anomaly maps (B, H, W)."""
        if self.device != "cpu":
            return self._runner.run(batch)
        # On the CPU, as many pixels per engine call as Padim's CPU forward: a batch of large frames would
        # otherwise hold gigabytes of activations, and smaller calls were no slower (8 vs 32 images of 256 px).
        count = inputs_per_call(batch.shape[2] * batch.shape[3])
        parts = [self._runner.run(batch[start : start + count]) for start in range(0, len(batch), count)]
        return np.concatenate([scores for scores, _ in parts]), np.concatenate([maps for _, maps in parts])

    def save_metadata(self) -> None:
        """Write the current threshold and calibration (e.g. after ``set_threshold`` or ``fastpadim calibrate``)
        into the file's metadata, as ``Padim.to_metadata`` records them."""
        self.metadata_.update(self.threshold_metadata())
        write_metadata(self.path, self.metadata_)

    def __repr__(self) -> str:
        return (f"OnnxPadim({str(self.path)!r}, engine={self.engine!r}, precision={self.precision!r}, "
                f"backbone={self.backbone!r}, backbone_precision={self.backbone_precision!r})")
