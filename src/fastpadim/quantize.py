"""An int8 backbone for ONNX exports (``fastpadim export --int8``): NNCF post-training quantisation.

Why: the backbone's convolutions are most of an export's compute on the CPU, and onnxruntime and OpenVINO run
them as int8 convolutions when the graph says so (QuantizeLinear/DequantizeLinear pairs around them: weights
per channel, activations with scales calibrated on good images). What it costs: the features are rounded to 8
bits while the Gaussians were fitted on float32 ones, so scores move and the accuracy may drop; the change
measured on real data is in docs/performance.md. Only the backbone is quantised: the Mahalanobis scoring,
upsampling and blur stay float32. It is opt-in and float32 stays the default.

NNCF imports PyTorch itself (this module does not); it is needed at export time only, never to run an export.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import warnings
from typing import TYPE_CHECKING, Iterable

import numpy as np

from .errors import FastpadimError

if TYPE_CHECKING:
    import onnx

# Fewer good images give activation ranges that the next good image exceeds (clipped features, false alarms).
MIN_CALIBRATION_IMAGES = 10
INSTALL_HINT = "int8 exports need NNCF: pip install 'fastpadim[int8]'"
# Loggers that speak while NNCF loads and runs; what they say (backends found, no CUDA) means nothing to users.
_QUIET_LOGGERS = ("nncf", "torch.utils.cpp_extension")


def check_installed() -> None:
    """Refuse in one line where NNCF is missing (found, not imported: importing it takes seconds)."""
    if importlib.util.find_spec("nncf") is None:
        raise FastpadimError(INSTALL_HINT)


def single_images(batches: Iterable[np.ndarray]) -> list[np.ndarray]:
    """Preprocessed batches (N, 3, H, W) as float32 images (1, 3, H, W): NNCF's subset size counts items, and
    one image per item makes it count images whatever the batches were."""
    images = []
    for batch in batches:
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise FastpadimError(f"calibration batches must be preprocessed images (N, 3, H, W), got shape {batch.shape}")
        images.extend(batch[index : index + 1] for index in range(len(batch)))
    return images


@contextlib.contextmanager
def _quiet():
    """NNCF's loggers, warnings and progress bars (rich, printed to stdout) silenced for the duration.
    stdout is swapped for the whole process meanwhile: an export is one job at a time."""
    levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    try:
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def quantize_backbone(graph: onnx.ModelProto, calibration: Iterable[np.ndarray]) -> onnx.ModelProto:
    """The backbone ``graph`` (preprocessed images → embeddings) with int8 weights and activations in QDQ form,
    the activation ranges calibrated on ``calibration`` (preprocessed good images in float32 batches, N, 3, H, W,
    all of them used). Its single input keeps its name; at least ``MIN_CALIBRATION_IMAGES`` images are needed."""
    images = single_images(calibration)
    if len(images) < MIN_CALIBRATION_IMAGES:
        raise FastpadimError(f"int8 calibration needs at least {MIN_CALIBRATION_IMAGES} readable good images, "
                             f"got {len(images)}")
    check_installed()
    input_name = graph.graph.input[0].name
    with _quiet():
        import nncf

        dataset = nncf.Dataset(images, lambda image: {input_name: image})
        return nncf.quantize(graph, dataset, subset_size=len(images))
