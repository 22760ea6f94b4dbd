"""Where training and test images come from: a folder, a glob, a text file of paths, or video files.

A source resolves to a flat list of ``Item``s (an image file, or one frame of a video) so it can be split
into shards and resumed by name. Frames are named ``video.mp4#frame=123`` (0-based, in presentation order)
and decoded on demand with PyAV, one pass per run of consecutive frames of a video.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FastpadimError
from .images import IMAGE_SUFFIXES, list_images

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".wmv", ".flv"})
LIST_SUFFIXES = frozenset({".txt", ".lst", ".list"})
FRAME_MARK = "#frame="
VIDEO_INSTALL_HINT = "reading video needs PyAV: pip install 'fastpadim[video]'"

Skipped = list[tuple[str, str]]  # (name, one-line reason), as Padim.skipped_


@dataclass(frozen=True)
class Item:
    """One input: an image file, or frame ``frame`` of the video at ``path``."""

    path: str
    frame: int | None = None

    @property
    def name(self) -> str:
        return self.path if self.frame is None else f"{self.path}{FRAME_MARK}{self.frame}"


def _av():
    try:
        import av
    except ImportError:
        raise FastpadimError(VIDEO_INSTALL_HINT) from None
    return av


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def video_frame_count(path: str | os.PathLike) -> int:
    """Frames in the first video stream, counted by demuxing (no decoding): one packet is one frame."""
    av = _av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise FastpadimError(f"{path}: has no video stream")
            count = 0
            try:
                for packet in container.demux(container.streams.video[0]):
                    count += packet.size > 0
            except av.error.FFmpegError:
                pass  # a damaged tail: the frames before it still count
            return count
    except av.error.FFmpegError as exc:
        raise FastpadimError(f"{path}: not a readable video ({exc})") from None


def video_items(path: str | os.PathLike, frame_stride: int = 1) -> list[Item]:
    if frame_stride < 1:
        raise FastpadimError(f"--frame-stride must be at least 1, got {frame_stride}")
    return [Item(str(path), i) for i in range(0, video_frame_count(path), frame_stride)]


def _file_items(path: Path, frame_stride: int, skipped: Skipped) -> list[Item]:
    if is_video(path):
        try:
            items = video_items(path, frame_stride)
        except FastpadimError as exc:
            if VIDEO_INSTALL_HINT in str(exc):
                raise
            skipped.append((str(path), str(exc)))
            return []
        if not items:
            skipped.append((str(path), f"{path}: video has no frames"))
        return items
    return [Item(str(path))]


def _list_file(path: Path) -> list[Path]:
    """A text file with one image or video path per line (relative to the file's folder; # comments)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FastpadimError(f"{path}: cannot read the list of paths ({exc})") from None
    entries = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [p if p.is_absolute() else path.parent / p for p in map(Path, entries)]


def resolve(source: str | os.PathLike, frame_stride: int = 1) -> tuple[list[Item], Skipped]:
    """The items of a source, and the inputs that were unusable as a whole (e.g. an unreadable video).

    ``source``: an image or video file, a folder (searched recursively for both), a glob pattern, or a
    text file (.txt/.lst/.list) of paths. Missing or unreadable images are left to the decoder, which
    reports and skips them like any image that cannot be read.
    """
    text = str(source)
    path = Path(text)
    skipped: Skipped = []
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES]
        if not files:
            list_images(path)  # raises the usual one-line "no images found"
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        files = _list_file(path)
        if not files:
            raise FastpadimError(f"{path}: the list of paths is empty")
    elif path.is_file():
        files = [path]
    elif glob.has_magic(text):
        files = [Path(p) for p in sorted(glob.glob(text, recursive=True))
                 if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES]
        if not files:
            raise FastpadimError(f"{text}: the pattern matches no image or video files")
    else:
        raise FastpadimError(f"{path}: no such file or folder")
    items = [item for f in files for item in _file_items(f, frame_stride, skipped)]
    if not items:
        reason = f" ({skipped[0][1]})" if skipped else ""
        raise FastpadimError(f"{text}: nothing to read{reason}")
    return items, skipped


def by_video(items: Iterable[Item]) -> dict[str, list[Item]]:
    """Frames grouped by their video (in order of first appearance); images are not part of any group."""
    groups: dict[str, list[Item]] = {}
    for item in items:
        if item.frame is not None:
            groups.setdefault(item.path, []).append(item)
    return groups


def _decode_frames(path: str, wanted: list[int], skipped: Skipped) -> Iterator[tuple[str, np.ndarray]]:
    """Decode one video once, from its start, yielding the wanted frames as RGB arrays.

    An undecodable packet counts as one frame (so later frames keep their numbers) and is reported if wanted.
    """
    av = _av()
    targets = set(wanted)
    last = max(wanted)
    index = 0
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            packets = container.demux(stream)
            while index <= last:
                try:
                    packet = next(packets)
                except StopIteration:
                    break
                except av.error.FFmpegError as exc:
                    if index in targets:
                        skipped.append((f"{path}{FRAME_MARK}{index}", f"{path}{FRAME_MARK}{index}: unreadable ({exc})"))
                    break
                try:
                    frames = packet.decode()
                except av.error.FFmpegError as exc:
                    if index in targets:
                        name = f"{path}{FRAME_MARK}{index}"
                        skipped.append((name, f"{name}: corrupt frame ({exc})"))
                    index += 1
                    continue
                for frame in frames:
                    if index in targets:
                        yield f"{path}{FRAME_MARK}{index}", frame.to_ndarray(format="rgb24")
                    index += 1
    except av.error.FFmpegError as exc:
        for i in sorted(targets):
            if i >= index:
                skipped.append((f"{path}{FRAME_MARK}{i}", f"{path}{FRAME_MARK}{i}: unreadable video ({exc})"))
        return
    for i in sorted(targets):
        if i >= index:
            name = f"{path}{FRAME_MARK}{i}"
            skipped.append((name, f"{name}: not in the video (it has {index} frames)"))


def load(items: Iterable[Item], skipped: Skipped | None = None) -> Iterator[tuple[str, object]]:
    """(name, input for Padim) per item: image paths as they are, frames decoded to RGB arrays.

    Frames that cannot be decoded are appended to ``skipped`` and left out; images are left to Padim,
    which reports unreadable ones itself.
    """
    skipped = [] if skipped is None else skipped
    run: list[Item] = []

    def flush():
        if run:
            yield from _decode_frames(run[0].path, [i.frame for i in run], skipped)
            run.clear()

    for item in items:
        if item.frame is None:
            yield from flush()
            yield item.name, item.path
        else:
            if run and run[0].path != item.path:
                yield from flush()
            run.append(item)
    yield from flush()


def inputs(items: Iterable[Item], skipped: Skipped | None = None, names: list[str] | None = None) -> Iterator[object]:
    """Just the inputs of ``load`` (what ``Padim.fit``/``iter_scored`` take); ``names`` collects their names in order."""
    for name, value in load(items, skipped):
        if names is not None:
            names.append(name)
        yield value


class Rereadable:
    """The inputs of items, lazily and as often as they are iterated (a fit reads its images twice: the statistics,
    then the calibration scores), so video frames are decoded per pass instead of held in memory. Frames that
    cannot be decoded are reported in ``skipped`` on the first pass only."""

    def __init__(self, items: Sequence[Item], skipped: Skipped):
        self.items, self.skipped, self._passes = list(items), skipped, 0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[object]:
        self._passes += 1
        return inputs(self.items, self.skipped if self._passes == 1 else [])


def is_source(images) -> bool:
    """A path that names several inputs (a folder, a glob, a list file, a video), as the command line reads it."""
    if not isinstance(images, (str, os.PathLike)):
        return False
    text = str(images)
    path = Path(text)
    if path.is_dir() or is_video(path):
        return True
    if path.is_file():
        return path.suffix.lower() in LIST_SUFFIXES
    return glob.has_magic(text)


def expand(images) -> tuple[Iterable, Skipped]:
    """What the Python API was given, as inputs: a folder, glob, list file or video means the same as on the
    command line (``resolve``), never the characters of a string; anything else is returned as it is.
    Also returns the inputs that were unusable as a whole (e.g. an unreadable video)."""
    if not is_source(images):
        return images, []
    items, skipped = resolve(images)
    if all(item.frame is None for item in items):
        return [item.path for item in items], skipped
    return Rereadable(items, skipped), skipped  # frames are decoded lazily, on every pass

