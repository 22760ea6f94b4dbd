"""``OnnxPadim``: an ONNX export (``fastpadim export``) scored by onnxruntime or OpenVINO, without PyTorch.

It gives the same ``predict``/``score``/``iter_scored`` outputs as ``Padim``: decoding and preprocessing are
the shared NumPy code of ``fastpadim.images``, the scoring API the shared ``ScoringMixin``. The threshold and
preprocessing come from the file's metadata (``metadata_props["fastpadim"]``), which ``write_metadata`` and
``OnnxPadim.save_metadata`` change in place without touching the graph or its data file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .errors import FastpadimError
from .images import ImageInput, Preprocessing, iter_batches, single_or_many, stack_arrays
from .results import Progress, ScoredImage, ScoringMixin

METADATA_KEY = "fastpadim"
EXPORT_FORMAT_VERSION = 1
INPUT_NAME = "images"
MAP_OUTPUT = "anomaly_map"
SCORE_OUTPUT = "score"
ENGINES = ("onnxruntime", "openvino")


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


def _metadata_of(path: Path, proto) -> dict:
    props = {entry.key: entry.value for entry in proto.metadata_props}
    raw = props.get(METADATA_KEY)
    if raw is None:
        raise FastpadimError(f"{path}: an ONNX model, but not one exported by fastpadim (no fastpadim metadata)")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise FastpadimError(f"{path}: its fastpadim metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != "fastpadim" or not isinstance(meta.get("export"), dict):
        raise FastpadimError(f"{path}: its fastpadim metadata does not describe an ONNX export")
    version = meta["export"].get("format_version")
    if not isinstance(version, int):
        raise FastpadimError(f"{path}: its fastpadim metadata has no valid export version")
    if version > EXPORT_FORMAT_VERSION:
        raise FastpadimError(f"{path}: export format {version} is newer than this fastpadim reads ({EXPORT_FORMAT_VERSION}); upgrade fastpadim")
    return meta


def _check_external_data(path: Path, proto) -> None:
    """Every external tensor must lie inside its data file: a missing or cut data file gets a clear line."""
    from onnx import TensorProto

    sizes: dict[str, int] = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        if location not in sizes:
            data_path = path.parent / location
            if not data_path.is_file():
                raise FastpadimError(f"{path}: its data file {location} is missing (keep it beside the .onnx file)")
            sizes[location] = data_path.stat().st_size
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > sizes[location]:
            raise FastpadimError(f"{path}: its data file {location} is truncated ({sizes[location]} bytes, needs {end})")


def read_metadata(path: str | os.PathLike) -> dict:
    """The fastpadim metadata of an ONNX export (the .padim metadata plus an ``export`` section)."""
    path = Path(path)
    return _metadata_of(path, _load_graph(path))


def write_metadata(path: str | os.PathLike, meta: dict) -> None:
    """Replace an export's fastpadim metadata (threshold, preprocessing); the graph and data file are kept."""
    import onnx

    from .modelfile import atomic_write

    path = Path(path)
    proto = _load_graph(path)
    _metadata_of(path, proto)  # only fastpadim exports are edited
    if not isinstance(meta, dict) or meta.get("format") != "fastpadim" or "export" not in meta:
        raise FastpadimError("new metadata must be a fastpadim export's metadata dict (read it with read_metadata)")
    Preprocessing.from_dict(meta["preprocessing"])  # a bad edit fails here, not when the model is next used
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            entry.value = json.dumps(meta)
    # tensors stay external: only the small graph file is rewritten, atomically
    atomic_write(path, lambda tmp: onnx.save_model(proto, tmp))


def write_threshold(path: str | os.PathLike, threshold: float | None) -> None:
    """Set (or with None, remove) the image threshold stored in an ONNX export."""
    meta = read_metadata(path)
    meta["threshold"] = {**meta["threshold"], "image": None if threshold is None else float(threshold),
                         "n_good_images": None}
    write_metadata(path, meta)


# ---------------------------------------------------------------------------------------- engines
class _OnnxRuntimeEngine:
    def __init__(self, path: Path, device: str, threads: int | None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise FastpadimError("onnxruntime is not installed: pip install 'fastpadim[runtime]'") from None
        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise FastpadimError("--device cuda was asked for, but this onnxruntime has no CUDA provider")
        use_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in available
        providers = (["CUDAExecutionProvider"] if use_cuda else []) + ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: the user sees our one-line messages
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise FastpadimError(f"{path}: onnxruntime cannot load it ({reason})") from None
        self.device = "cuda" if use_cuda else "cpu"

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.session.run([MAP_OUTPUT, SCORE_OUTPUT], {INPUT_NAME: batch})
        return scores, maps


class _OpenVinoEngine:
    def __init__(self, path: Path, device: str, threads: int | None):
        try:
            import openvino as ov
        except ImportError:
            raise FastpadimError("OpenVINO is not installed: pip install 'fastpadim[openvino]'") from None
        if device not in ("auto", "cpu"):
            raise FastpadimError(f"the OpenVINO engine runs on the CPU here; --device {device} is not supported")
        config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
        try:
            core = ov.Core()
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        except Exception as exc:  # noqa: BLE001
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FastpadimError(f"{path}: OpenVINO cannot load it ({reason})") from None
        self.request = self.compiled.create_infer_request()
        self.map_port, self.score_port = self.compiled.output(MAP_OUTPUT), self.compiled.output(SCORE_OUTPUT)
        self.device = "cpu"

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        results = self.request.infer({INPUT_NAME: batch})
        return np.array(results[self.score_port]), np.array(results[self.map_port])


# ------------------------------------------------------------------------------------------ model
class OnnxPadim(ScoringMixin):
    """A PaDiM model exported to ONNX, scored without PyTorch; the same outputs as ``Padim``.

    ``engine``: "onnxruntime" or "openvino". Attributes as on ``Padim``: ``threshold_``, ``preprocessing_``,
    ``false_alarm_rate``, ``n_samples_seen_``, ``metadata_`` (the stored metadata), ``batch_size``, ``workers``.
    """

    def __init__(self, path: str | os.PathLike, engine: str = "onnxruntime", device: str = "auto",
                 batch_size: int = 32, workers: int = 2, threads: int | None = None):
        if engine not in ENGINES:
            raise FastpadimError(f"unknown engine {engine!r} (use {' or '.join(ENGINES)})")
        if device not in ("auto", "cpu", "cuda"):
            raise FastpadimError(f"unknown device {device!r} (use auto, cpu or cuda)")
        self.path = Path(path)
        proto = _load_graph(self.path)
        self.metadata_ = _metadata_of(self.path, proto)
        _check_external_data(self.path, proto)
        del proto
        meta = self.metadata_
        self.preprocessing_ = Preprocessing.from_dict(meta["preprocessing"])
        input_side = meta["export"]["input"]["shape"][-1]
        if self.preprocessing_.output_size != input_side:
            raise FastpadimError(
                f"{self.path}: its preprocessing gives {self.preprocessing_.output_size} px images, but the graph takes {input_side} px"
            )
        self.threshold_ = meta["threshold"]["image"]
        self.threshold_count_ = meta["threshold"].get("n_good_images")
        self.false_alarm_rate = meta["threshold"]["false_alarm_rate"]
        self.n_samples_seen_ = meta["n_train_images"]
        self.backbone = meta["backbone"]["name"]
        self.batch_size = batch_size
        self.workers = workers
        self.skipped_: list[tuple[str, str]] = []
        self.engine = engine
        runner = _OnnxRuntimeEngine if engine == "onnxruntime" else _OpenVinoEngine
        self._runner = runner(self.path, device, threads)
        self.device = self._runner.device

    def iter_scored(self, images: Iterable[ImageInput], keep_view: bool = False,
                    progress: Progress | None = None) -> Iterator[list[ScoredImage]]:
        """Score in batches, yielding each batch's results (unreadable inputs carry their error)."""
        batches = iter_batches(single_or_many(images), self.preprocessing_, self.batch_size, self.workers, keep_view)
        for batch in batches:
            good = [item for item in batch if item.array is not None]
            results = {item.index: ScoredImage(item.index, item.name, error=item.error) for item in batch if item.error}
            if good:
                scores, maps = self._runner.run(stack_arrays(good))
                for item, score, amap in zip(good, scores, maps):
                    results[item.index] = ScoredImage(item.index, item.name, float(score), amap, item.view)
            if progress:
                progress(len(batch))
            yield [results[item.index] for item in batch]

    def save_metadata(self) -> None:
        """Write the current threshold (e.g. after ``set_threshold``) into the file's metadata."""
        self.metadata_["threshold"] = {"image": self.threshold_, "false_alarm_rate": self.false_alarm_rate,
                                       "n_good_images": getattr(self, "threshold_count_", None)}
        write_metadata(self.path, self.metadata_)

    def __repr__(self) -> str:
        return f"OnnxPadim({str(self.path)!r}, engine={self.engine!r}, backbone={self.backbone!r})"
