"""``fastpadim serve``'s parts that need no FastAPI: limits and their checks, decoding uploads, giving memory back,
scoring a batch, summaries. The HTTP API itself (``create_app``) is ``fastpadim.http_api``.

Requests are decoded in threads, then grouped into network batches by ``MicroBatcher`` (one thread owns the
model), so the event loop keeps answering (``/health`` included) while images are scored. Memory is bounded per
image (the pixel limit, checked from the header), across requests (``PixelBudget``: pixels decoded at once), and
is given back to the OS after large decodes (glibc's ``malloc_trim``). With records, every verdict is recorded
(``Recorder``) and copies of images are kept for review.
"""

# No ``from __future__ import annotations`` here: FastAPI must resolve the route signatures' types at run time.
import base64
import ctypes
import errno
import functools
import io
import logging
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np

from .errors import FastpadimError, ImageError
from .images import MAX_IMAGE_PIXELS, check_max_pixels
from .sizes import Size, to_json

if TYPE_CHECKING:
    from pathlib import Path

    from PIL import Image

    from .images import Preprocessing
    from .model import Padim
    from .onnx_runtime import OnnxPadim
    from .records import Inspection
    from .results import ScoredImage

MULTIPART_SLACK = 64 * 1024  # room for multipart boundaries and headers around the image bytes
MAX_BATCH_FILES = 64  # images in one /v1/score/batch request
RAW_TYPES = ("application/octet-stream",)  # besides image/*
UPLOAD_HINT = "send an image as the multipart field 'file' (curl -F file=@image.png) or as the raw request body"
MAX_DECODING_PIXELS = 2 * MAX_IMAGE_PIXELS  # pixels being decoded at once, all requests together
TRIM_AFTER_PIXELS = 4_000_000  # decodes this large leave freed heap that glibc keeps: give it back once idle
log = logging.getLogger("fastpadim.serve")


@dataclass
class Upload:
    """One decoded upload: what the network scores, and what the reply needs of the frame (the image as sent)."""

    image: "Image.Image"  # resized to the network's input (the frame itself without preprocessing)
    frame_size: Optional[Size] = None  # the frame's (height, width), EXIF orientation applied: regions are in it
    frame: "Optional[Image.Image]" = None  # the frame's pixels, kept only to draw an overlay on


def decode_upload(data: bytes, name: str, preprocessing: "Preprocessing | None" = None,
                  max_pixels: int | None = None, frame_size: bool = False, keep_frame: bool = False) -> Upload:
    """Uploaded bytes → an ``Upload``, or ImageError with a one-line reason (same checks as files on disk; above
    ``max_pixels``, default ``images.MAX_IMAGE_PIXELS``: ImageTooLarge, from the header; a frame whose shape this
    model would squash is refused as ``fastpadim predict`` refuses it).

    With ``preprocessing`` the image to score is resized to the network's input (a large JPEG decoded at reduced
    scale), so a request waiting for its batch holds a small image; the scores are the same (the model's own resize
    of it is then a copy). A reply in the frame's pixels needs the frame decoded in full: ``frame_size`` records
    its size (for regions), ``keep_frame`` also keeps its pixels (for an overlay, the one case that holds a
    full-resolution image until the reply)."""
    from .images import open_image

    full = frame_size or keep_frame or preprocessing is None
    image = open_image(data, name=name, max_pixels=max_pixels, reduce_to=None if full else preprocessing.image_size)
    upload = Upload(image, (image.height, image.width) if full else None, image if keep_frame else None)
    if preprocessing is not None:
        try:
            preprocessing.check_shape((image.height, image.width))  # resizing first would hide a squash
        except ImageError as exc:
            raise ImageError(f"{name}: {exc}") from None
        upload.image = preprocessing.resize(image)
    return upload


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim, freed memory is handled there
        return None


def release_memory() -> bool:
    """Hand freed heap memory back to the OS. glibc keeps what a large decode freed (Pillow's 16 MB blocks fall
    under its raised mmap threshold), so without this the service stays at its peak after a burst of large
    images. False where there is no glibc."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def check_options(max_batch: int, max_wait_ms: float, max_upload_mb: float, max_pixels: int,
                  max_decoding_pixels: int) -> None:
    """The service's limits, checked before anything slow (loading the model) happens."""
    if max_batch < 1:
        raise FastpadimError(f"--max-batch must be at least 1, got {max_batch}")
    if not max_wait_ms >= 0:  # NaN too
        raise FastpadimError(f"--max-wait-ms must be >= 0, got {max_wait_ms}")
    if not 0 < max_upload_mb < float("inf"):
        raise FastpadimError(f"--max-upload-mb must be > 0, got {max_upload_mb}")
    check_max_pixels(max_pixels, "--max-pixels")
    if isinstance(max_decoding_pixels, bool) or not isinstance(max_decoding_pixels, int) or max_decoding_pixels < 1:
        raise FastpadimError(f"--max-decoding-pixels must be a whole number of pixels >= 1, "
                             f"got {max_decoding_pixels!r}")


def check_port(host: str, port: int) -> None:
    """Fail in one line, before the model is loaded, when ``host:port`` cannot be listened on (in use, not an
    address of this machine, a privileged port). Binds the way uvicorn does (SO_REUSEADDR), then lets go."""
    if not 0 < port < 65536:
        raise FastpadimError(f"--port must be between 1 and 65535, got {port}")
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise FastpadimError(f"cannot listen on {where}: unknown host ({exc.strerror}); use an address of this "
                             "machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio's create_server
                sock.bind(address)
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            hint = {errno.EADDRINUSE: "stop the other server or choose another --port",
                    errno.EACCES: "ports below 1024 need privileges; choose a --port above 1023",
                    errno.EADDRNOTAVAIL: "use an address of this machine, e.g. 127.0.0.1 or 0.0.0.0"}.get(exc.errno)
            raise FastpadimError(f"cannot listen on {where}: {reason}" + (f"; {hint}" if hint else "")) from None


def score_batch(model: "Padim", images: list) -> "list[ScoredImage]":
    """The batcher's work, always on the model thread: one network batch for all ``images`` (network-sized: the
    frames, where a reply needs them, stay with their requests)."""
    return [result for batch in model.iter_scored(images, batch_size=max(1, len(images))) for result in batch]


def warm_up(model: "Padim") -> None:
    """One throw-away run so the first real request does not pay for lazy initialisation."""
    from PIL import Image

    height, width = model.preprocessing_.image_size
    frame = Image.new("RGB", (width, height), (128, 128, 128))
    (result,) = score_batch(model, [frame])
    # loads the colour map (matplotlib) and the label's font before the first heatmap
    in_frame(model, Upload(frame, (height, width), frame), result, heatmap=True, regions=False)


def overlay_png_base64(frame: np.ndarray, frame_map: np.ndarray, threshold: float | None,
                       result: "ScoredImage | None" = None) -> str:
    """The heatmap overlay as base64 PNG, labelled with ``result``'s verdict and score where given."""
    from .visualize import Label, overlay

    label = None if result is None else Label.of(result, threshold)
    buffer = io.BytesIO()
    overlay(frame, frame_map, threshold, label=label).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def in_frame(model: "Padim | OnnxPadim", upload: Upload, result: "ScoredImage", heatmap: bool,
             regions: bool) -> tuple[dict, dict]:
    """The reply's parts in the frame's pixels, from the network's map put back in them (``Preprocessing.to_frame``):
    the overlay (``heatmap_png_base64``, the frame's size) and the defect regions (boxes in the frame's pixels).
    Returns them and the seconds each took (the map's own resizing counted in the first)."""
    from .regions import find_regions

    start = time.perf_counter()
    frame_map = model.preprocessing_.to_frame(result.anomaly_map, upload.frame_size)
    parts, seconds = {}, {}
    if heatmap:
        parts["heatmap_png_base64"] = overlay_png_base64(np.asarray(upload.frame), frame_map, model.threshold_, result)
        seconds["heatmap"], start = time.perf_counter() - start, time.perf_counter()
    if regions:
        parts.update(find_regions(frame_map, model.threshold_).to_dict())
        seconds["regions"] = time.perf_counter() - start
    return parts, seconds


def readable_score(result: "ScoredImage") -> dict:
    """A reply's readable score beside the raw one: ``normalized`` (score / threshold, 1.0 at the threshold) and
    ``false_alarm_probability`` (of a good part scoring this high); null where the model has no threshold or no
    calibration."""
    return {"normalized": result.normalized, "false_alarm_probability": result.false_alarm_probability}


def model_summary(model: "Padim | OnnxPadim", model_path: str | None) -> dict:
    if not hasattr(model, "to_metadata"):  # an ONNX export: the metadata stored in it (no torch needed)
        meta, engine, device = model.metadata_, model.engine, model.device
    else:  # a Padim: its network runs on engine_ (torch, or an ONNX engine for the embeddings)
        meta, engine, device = model.to_metadata(), model.engine_, model.device_.type
    bb, th = meta["backbone"], meta["threshold"]
    pre = model.preprocessing_.to_dict()  # sizes as the model file writes them: N for a square, else [h, w]
    return {
        "model_file": model_path,
        "format_version": meta["format_version"],
        "fastpadim_version": meta["fastpadim_version"],
        "backbone": bb["name"],
        "timm_name": bb["timm_name"],
        "layers": bb["layers"],
        "n_features": bb["n_features"],
        "weights_id": bb["weights_id"],
        "input": {"image_size": pre["image_size"], "crop_size": pre["crop_size"],
                  "map_size": to_json(model.preprocessing_.output_size)},  # the network's view; replies use the frame's pixels
        "n_train_images": meta["n_train_images"],
        "threshold": model.threshold_,
        "false_alarm_rate": th["false_alarm_rate"],
        "calibration": model.calibration_summary(),
        "device": device,
        "engine": engine,
    }


class Recorder:
    """The service's verdicts into the records (``records.Records``), with copies of images kept for review
    (``kept``, a ``kept_images.KeptImages``). Its methods do file and database work: call them in a worker thread."""

    def __init__(self, records, station: str, kept=None):
        self.records, self.station, self.kept = records, station, kept

    def record(self, entries: "list[tuple[Inspection, bytes]]") -> list[int]:
        """Keep the images wanted, then add the inspections (one transaction); returns their ids."""
        for inspection, data in entries:
            if self.kept is not None and inspection.digest and self.kept.wanted(inspection.verdict):
                try:
                    inspection.image_path = str(self.kept.keep(data, inspection.digest))
                except FastpadimError as exc:  # the verdict is recorded all the same, without its image
                    log.error("could not keep a copy of %s: %s", inspection.path, exc)
        ids = self.records.add_many([inspection for inspection, _ in entries])
        if self.kept is not None and self.kept.due():
            try:  # the verdicts are written: retention failing must not cost their ids
                self.forget(self.kept.prune())
            except (OSError, FastpadimError) as exc:
                log.error("retention of kept images in %s failed: %s", self.kept.folder, exc)
        return ids

    def forget(self, deleted: "list[Path]") -> None:
        """The records of images deleted by retention (kept by this run or an earlier one) no longer point at
        them."""
        if deleted:
            self.records.forget_images([str(path) for path in deleted])

    def described(self, inspection: "Inspection") -> dict:
        """An inspection as the API shows it: its fields, and where its kept image can be read (or None)."""
        kept = self.kept is not None and self.kept.contains(inspection.image_path)
        return {**inspection.to_dict(), "image_url": f"/v1/inspections/{inspection.id}/image" if kept else None}

    def recent(self, **filters) -> list[dict]:
        return [self.described(inspection) for inspection in self.records.recent(**filters)]

    def image(self, id_: int) -> "Path | None":
        """The kept copy of inspection ``id_``: only ever a file inside the keep folder."""
        return self.kept.contains(self.records.get(id_).image_path) if self.kept is not None else None

    def label(self, id_: int, label: str | None, by: str | None) -> dict:
        self.records.get(id_)  # an unknown id fails here, in the records' words
        return self.described(self.records.label(id_, label, by))
