"""Evaluation data sets on disk: the MVTec AD layout and the same layout for users' own data.

A category folder holds ``train/`` (good images, searched recursively; MVTec puts them in ``train/good``) and
``test/<type>/`` (``good`` = normal, any other name = anomalous). Masks are optional; they live in
``ground_truth/`` (MVTec) or ``masks/``, either under ``<type>/`` or flat, and are matched to test images by file
stem, as ``<stem>_mask.<ext>`` (MVTec) or ``<stem>.<ext>``, in any image format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import FastpadimError
from ..images import IMAGE_SUFFIXES, Preprocessing, list_images, read_size
from ..sizes import Size

MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
MVTEC_OBJECTS = ("bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw", "toothbrush", "transistor",
                 "zipper")
MASK_FOLDERS = ("ground_truth", "masks")
GOOD = "good"


@dataclass(frozen=True)
class TestImage:
    path: Path
    defect_type: str  # the test sub-folder; "good" = normal
    mask: Path | None = None

    @property
    def is_anomalous(self) -> bool:
        return self.defect_type != GOOD


@dataclass
class Category:
    """One evaluation unit: good training images and labelled test images (with masks when given)."""

    name: str
    train: list[Path]
    test: list[TestImage]
    has_masks: bool
    notes: list[str] = field(default_factory=list)  # why a metric is skipped, said in the report

    @property
    def labels(self) -> np.ndarray:
        return np.array([item.is_anomalous for item in self.test], dtype=bool)


def is_category_folder(folder: Path) -> bool:
    return (folder / "train").is_dir() and (folder / "test").is_dir()


def find_categories(root: Path, names: list[str] | None = None) -> list[Path]:
    """ROOT itself when it is a category folder, else its category sub-folders (all, or the ``names`` asked)."""
    root = Path(root)
    if not root.is_dir():
        raise FastpadimError(f"{root}: no such folder")
    if is_category_folder(root):
        if names and names != [root.name]:
            raise FastpadimError(f"{root} is a single category folder ({root.name}); --categories does not apply")
        return [root]
    if names:
        missing = [n for n in names if not is_category_folder(root / n)]
        if missing:
            raise FastpadimError(f"{root}: no category folder with train/ and test/ for {', '.join(missing)}")
        return [root / n for n in names]
    found = sorted(p for p in root.iterdir() if is_category_folder(p))
    if not found:
        raise FastpadimError(f"{root}: neither a category folder (train/ and test/) nor a folder of them")
    return found


def _mask_index(folder: Path) -> dict[tuple[str, str], list[Path]]:
    """(type or "", stem with any "_mask" suffix removed) → mask files."""
    index: dict[tuple[str, str], list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if not (path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES):
            continue
        rel = path.relative_to(folder)
        kind = rel.parts[0] if len(rel.parts) > 1 else ""
        stem = path.stem[: -len("_mask")] if path.stem.endswith("_mask") else path.stem
        index.setdefault((kind, stem), []).append(path)
    return index


def load_category(folder: Path) -> Category:
    """Read a category folder's file lists and match masks; errors name the first offending file."""
    folder = Path(folder)
    train = list_images(folder / "train")
    test_root = folder / "test"
    types = sorted(p for p in test_root.iterdir() if p.is_dir())
    if not types:
        raise FastpadimError(f"{test_root}: no sub-folders; put test images in test/good and test/<defect type>")
    test = [TestImage(path, kind.name) for kind in types for path in list_images(kind)]
    mask_dirs = [folder / name for name in MASK_FOLDERS if (folder / name).is_dir()]
    category = Category(folder.name, train, test, has_masks=bool(mask_dirs))
    if len(mask_dirs) > 1:
        raise FastpadimError(f"{folder}: both ground_truth/ and masks/ exist; keep one")
    if mask_dirs:
        index = _mask_index(mask_dirs[0])
        matched = []
        for item in test:
            found = index.get((item.defect_type, item.path.stem)) or index.get(("", item.path.stem)) or []
            if len(found) > 1:
                raise FastpadimError(f"{item.path}: several masks match it ({', '.join(str(p) for p in found)})")
            if not found and item.is_anomalous:
                raise FastpadimError(
                    f"{item.path}: anomalous test image without a mask in {mask_dirs[0]} "
                    f"(expected {item.defect_type}/{item.path.stem}_mask.png or {item.path.stem}.<ext>)"
                )
            matched.append(TestImage(item.path, item.defect_type, found[0] if found else None))
        category.test = matched
    else:
        category.notes.append("no ground_truth/ or masks/ folder: image-level metrics only")
    labels = category.labels
    if labels.all() or not labels.any():
        kind = "anomalous" if labels.all() else "good"
        category.notes.append(f"all {labels.size} test images are {kind}: AUROC, PRO and F1 cannot be computed")
    return category


def frame_size(item: TestImage) -> Size:
    """The test image's (height, width), from its header (nothing decoded)."""
    width, height = read_size(item.path)
    return (height, width)


def open_mask(item: TestImage) -> Image.Image | None:
    """The item's mask image, checked against its image's size; None for a good image without one."""
    if item.mask is None:
        if item.is_anomalous:
            raise FastpadimError(f"{item.path}: anomalous test image without a mask")
        return None
    height, width = frame_size(item)
    try:
        with Image.open(item.mask) as handle:
            handle.load()
            mask = handle.copy()
    except (OSError, SyntaxError, ValueError) as exc:
        raise FastpadimError(f"{item.mask}: cannot read the mask ({exc})") from None
    if mask.size != (width, height):
        raise FastpadimError(
            f"{item.mask}: mask is {mask.size[0]}x{mask.size[1]} but its image {item.path.name} is {width}x{height}"
        )
    return mask


def load_mask(item: TestImage, preprocessing: Preprocessing | None = None) -> np.ndarray:
    """The item's ground truth as bool (height, width): at the image's own size (what the metrics use, so a
    defect of a few pixels counts as it is), or, given ``preprocessing``, in the network's view (to compare with
    ``anomaly_map``). No mask (a good image) = all normal."""
    mask = open_mask(item)
    if preprocessing is not None:
        if mask is None:
            return np.zeros(preprocessing.output_size, dtype=bool)
        return mask_array(preprocessing.mask_geometry(mask))
    return np.zeros(frame_size(item), dtype=bool) if mask is None else mask_array(mask)


def mask_array(mask: Image.Image) -> np.ndarray:
    """Any mask image → bool array: a pixel is defective when any channel is non-zero."""
    array = np.asarray(mask)
    return array.any(axis=-1) if array.ndim == 3 else array > 0
