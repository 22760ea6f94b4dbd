"""Rectangular high-resolution "camera frames" with small faint defects and exact masks, in the MVTec layout.

Each frame is one bottle image (MVTec AD bottle, 256x256 here) upscaled bicubic to the frame's height and centred
on a white canvas of the frame's size (default 960x1280, 4:3), so the object fills the middle and the sides are
plain background, as with a real camera that sees more than the part. Defective test frames are clean test frames
with synthetic defects painted at frame resolution, on the bottle (inside a disc well within its rim):

| kind      | shape                                                                  |
|-----------|------------------------------------------------------------------------|
| `spot`    | 1–2 filled discs, 3–6 px in diameter                                   |
| `speck`   | 1–2 clusters of 3–7 dots, each dot 1–3 px across, within a ~12 px radius |
| `scratch` | 1–2 straight lines 1–2 px wide, 20–80 px long, at a random angle       |

Every defect shifts the clean pixels under it by one contrast, drawn per defect from ``CONTRAST`` (25–60 grey
levels, all three channels alike, so the bottle's texture shows through), darker or lighter at random (lighter
when darker would clip, and the other way round). The mask is exactly the pixels that changed: a pixel is 255 in
``ground_truth/<kind>/<name>_mask.png`` if and only if the defective frame differs there from the clean frame.
The ranges were chosen once, up front, to match the issue's description ("spots of 3–6 px, specks, scratches
1–2 px wide", faint); they are not tuned to any model.

Layout written under OUT (readable by ``fastpadim evaluate OUT`` and ``fastpadim.evaluation.datasets``)::

    train/good/NNN.png              from the bottle's train/good
    test/good/NNN.png               from the bottle's test/good (clean)
    test/<kind>/NNN.png             defects painted on clean test frames (test/good sources, cycled; train unused)
    ground_truth/<kind>/NNN_mask.png
    defects.json                    every painted defect (kind, centre, size, contrast) and the settings

Deterministic from ``seed``. Needs numpy and Pillow only::

    python benchmarks/high_res_frames.py --out /tmp/hires/bottle_hr --size 960x1280 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BOTTLE, IMAGE_SUFFIXES

KINDS = ("spot", "speck", "scratch")
CONTRAST = (25, 60)          # grey levels added or removed, uniform per defect
SPOT_DIAMETER = (3, 6)       # px, inclusive
SPECK_DOTS = (3, 7)          # dots per cluster, inclusive
SPECK_DOT_SIZE = (1, 3)      # px across, inclusive
SPECK_RADIUS = 12.0          # px: the cluster's dots lie within this distance of its centre
SCRATCH_WIDTH = (1, 2)       # px, inclusive
SCRATCH_LENGTH = (20, 80)    # px, inclusive
DEFECTS_PER_FRAME = (1, 2)   # inclusive
OBJECT_RADIUS = 0.40         # defects lie within this fraction of the frame height of the object's centre
BACKGROUND = 255             # the canvas grey level (white, as the bottle images' own background)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def frame_from(source: Path | Image.Image, size: tuple[int, int], background: int = BACKGROUND) -> np.ndarray:
    """An RGB uint8 (H, W, 3) frame: the source upscaled bicubic to H x H (square sources) and centred on a canvas
    of the frame's size. A non-square source keeps its aspect ratio at height H (or fits the width)."""
    height, width = size
    image = source if isinstance(source, Image.Image) else Image.open(source)
    image = image.convert("RGB")
    scale = min(height / image.height, width / image.width)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if new != image.size:
        image = image.resize(new, Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (width, height), (background,) * 3)
    canvas.paste(image, ((width - new[0]) // 2, (height - new[1]) // 2))
    return np.asarray(canvas).copy()


def object_region(size: tuple[int, int]) -> tuple[float, float, float]:
    """(centre y, centre x, radius) of the disc where defects may go: the middle of the bottle."""
    height, width = size
    return (height - 1) / 2, (width - 1) / 2, OBJECT_RADIUS * min(height, width)


# --- shapes: boolean footprints on a local grid, returned as (rows, cols) pixel coordinates ------------------

def _disc(cy: float, cx: float, diameter: float) -> tuple[np.ndarray, np.ndarray]:
    r = diameter / 2
    y0, y1, x0, x1 = int(np.floor(cy - r)), int(np.ceil(cy + r)), int(np.floor(cx - r)), int(np.ceil(cx + r))
    ys, xs = np.mgrid[y0 - 1:y1 + 2, x0 - 1:x1 + 2]
    inside = (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r
    return ys[inside], xs[inside]


def _square(y0: int, x0: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[y0:y0 + side, x0:x0 + side]
    return ys.ravel(), xs.ravel()


def _segment(y0: float, x0: float, y1: float, x1: float, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A line ``width`` px thick across its main direction (a DDA line): one step per pixel along the main axis,
    there the ``width`` pixels nearest to the segment across it (1 px: an 8-connected line)."""
    across_y = abs(x1 - x0) >= abs(y1 - y0)  # mostly horizontal: thickness is counted in rows
    (m0, c0, m1, c1) = (x0, y0, x1, y1) if across_y else (y0, x0, y1, x1)
    if m1 < m0:
        m0, c0, m1, c1 = m1, c1, m0, c0
    main = np.arange(int(np.rint(m0)), int(np.rint(m1)) + 1)
    cross = c0 + (np.clip(main, m0, m1) - m0) * ((c1 - c0) / (m1 - m0) if m1 > m0 else 0.0)
    first = (np.rint(cross) if width % 2 else np.floor(cross)) - (width - 1) // 2  # nearest (odd) / just before
    main = np.repeat(main, width)
    cross = (first[:, None] + np.arange(width)[None, :]).ravel()
    rows, cols = (cross, main) if across_y else (main, cross)
    return rows.astype(np.int64), cols.astype(np.int64)


def _shape(kind: str, cy: float, cx: float, rng: np.random.Generator) -> tuple[tuple[np.ndarray, np.ndarray], dict]:
    if kind == "spot":
        diameter = int(rng.integers(SPOT_DIAMETER[0], SPOT_DIAMETER[1] + 1))
        return _disc(round(cy) + (diameter % 2 == 0) * 0.5, round(cx) + (diameter % 2 == 0) * 0.5, diameter), \
            {"diameter_px": diameter}
    if kind == "speck":
        n = int(rng.integers(SPECK_DOTS[0], SPECK_DOTS[1] + 1))
        ys, xs, sides = [], [], []
        for _ in range(n):
            angle, dist = rng.uniform(0, 2 * np.pi), SPECK_RADIUS * np.sqrt(rng.uniform())
            side = int(rng.integers(SPECK_DOT_SIZE[0], SPECK_DOT_SIZE[1] + 1))
            y, x = _square(int(np.rint(cy + dist * np.sin(angle))), int(np.rint(cx + dist * np.cos(angle))), side)
            ys.append(y), xs.append(x), sides.append(side)
        coords = np.unique(np.stack([np.concatenate(ys), np.concatenate(xs)]), axis=1)
        return (coords[0], coords[1]), {"dots": n, "dot_px": sides}
    if kind == "scratch":
        length = int(rng.integers(SCRATCH_LENGTH[0], SCRATCH_LENGTH[1] + 1))
        width = int(rng.integers(SCRATCH_WIDTH[0], SCRATCH_WIDTH[1] + 1))
        angle = rng.uniform(0, np.pi)
        dy, dx = length / 2 * np.sin(angle), length / 2 * np.cos(angle)
        return _segment(cy - dy, cx - dx, cy + dy, cx + dx, width), \
            {"length_px": length, "width_px": width, "angle_deg": round(float(np.degrees(angle)), 1)}
    raise ValueError(f"unknown defect kind {kind!r}; choose from {', '.join(KINDS)}")


def paint_defects(clean: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Paint 1–2 defects of one kind on a copy of the clean frame, inside ``object_region``; no two defects touch.
    Returns (frame, mask, descriptions); ``mask`` is exactly where ``frame`` differs from ``clean``."""
    height, width = clean.shape[:2]
    oy, ox, radius = object_region((height, width))
    frame = clean.astype(np.int16)
    mask = np.zeros((height, width), dtype=bool)
    taken = np.zeros((height, width), dtype=bool)  # placed defects grown by 2 px: the next one keeps clear
    luminance = clean.mean(axis=2)
    n = int(rng.integers(DEFECTS_PER_FRAME[0], DEFECTS_PER_FRAME[1] + 1))
    described = []
    for _ in range(n):
        for _attempt in range(1000):
            angle, dist = rng.uniform(0, 2 * np.pi), radius * np.sqrt(rng.uniform())
            cy, cx = oy + dist * np.sin(angle), ox + dist * np.cos(angle)
            (ys, xs), info = _shape(kind, cy, cx, rng)
            if ((ys - oy) ** 2 + (xs - ox) ** 2 <= radius * radius).all() and not taken[ys, xs].any():
                break
        else:  # pragma: no cover - a 0.8 H disc always has room for two small defects
            raise RuntimeError("could not place a defect")
        contrast = int(rng.integers(CONTRAST[0], CONTRAST[1] + 1))
        mean = float(luminance[ys, xs].mean())
        sign = -1 if rng.uniform() < 0.5 else 1
        if mean - contrast < 0:
            sign = 1
        elif mean + contrast > 255:
            sign = -1
        frame[ys, xs] += sign * contrast
        changed = np.zeros_like(mask)
        changed[ys, xs] = True
        taken |= _grow(changed, 2)
        described.append({"kind": kind, "centre_yx": [round(float(cy), 1), round(float(cx), 1)], "pixels": int(ys.size),
                          "contrast": sign * contrast, **info})
    out = np.clip(frame, 0, 255).astype(np.uint8)
    mask = (out != clean).any(axis=2)  # exactly the changed pixels (a pixel saturated in all channels stays out)
    return out, mask, described


def _grow(mask: np.ndarray, px: int) -> np.ndarray:
    grown = mask.copy()
    for dy in range(-px, px + 1):
        for dx in range(-px, px + 1):
            grown |= np.roll(mask, (dy, dx), axis=(0, 1))
    return grown


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=1)


def make_frames(bottle_root: Path = BOTTLE, out_root: Path = Path("/tmp/hires/bottle_hr"),
                size: tuple[int, int] = (960, 1280), seed: int = 0, n_test_good: int | None = None,
                n_defective_per_kind: int = 20, n_train: int | None = None,
                kinds: tuple[str, ...] = KINDS, background: int = BACKGROUND) -> dict:
    """Write the frame set under ``out_root`` (see the module docstring) and return its description
    (also written to ``out_root/defects.json``). ``size`` is (height, width). ``n_train`` / ``n_test_good`` limit
    the images taken from the bottle's train/good and test/good (None: all); defective frames cycle through the
    test/good sources used. Files already in ``out_root`` are overwritten, never deleted."""
    bottle_root, out_root = Path(bottle_root), Path(out_root)
    height, width = size
    train = _images(bottle_root / "train" / "good")[:n_train]
    test_good = _images(bottle_root / "test" / "good")[:n_test_good]
    if not train or not test_good:
        raise FileNotFoundError(f"{bottle_root}: needs images in train/good and test/good")
    for i, path in enumerate(train):
        _save(frame_from(path, size, background), out_root / "train" / "good" / f"{i:03d}.png")
    clean = []
    for i, path in enumerate(test_good):
        frame = frame_from(path, size, background)
        _save(frame, out_root / "test" / "good" / f"{i:03d}.png")
        clean.append(frame)
    defects = {}
    for k, kind in enumerate(kinds):
        for i in range(n_defective_per_kind):
            source = i % len(clean)
            rng = np.random.default_rng([seed, k, i])
            frame, mask, described = paint_defects(clean[source], kind, rng)
            name = f"{i:03d}"
            _save(frame, out_root / "test" / kind / f"{name}.png")
            _save(mask.astype(np.uint8) * 255, out_root / "ground_truth" / kind / f"{name}_mask.png")
            defects[f"{kind}/{name}"] = {"source": test_good[source].name, "defects": described}
    manifest = {
        "source": str(bottle_root), "size_hw": [height, width], "seed": seed, "background": background,
        "n_train": len(train), "n_test_good": len(test_good), "n_defective_per_kind": n_defective_per_kind,
        "contrast": CONTRAST, "spot_diameter_px": SPOT_DIAMETER, "speck_dots": SPECK_DOTS,
        "speck_dot_px": SPECK_DOT_SIZE, "speck_radius_px": SPECK_RADIUS, "scratch_width_px": SCRATCH_WIDTH,
        "scratch_length_px": SCRATCH_LENGTH, "defects_per_frame": DEFECTS_PER_FRAME,
        "object_radius_of_height": OBJECT_RADIUS, "frames": defects,
    }
    (out_root / "defects.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def parse_size(text: str) -> tuple[int, int]:
    """'960x1280' (height x width) → (960, 1280); a single number is a square."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected HxW, e.g. 960x1280") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 16:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected HxW with both at least 16, e.g. 960x1280")
    return values[0], values[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bottle", type=Path, default=BOTTLE, help="the MVTec AD bottle folder (source images)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/hires/bottle_hr"), help="the category folder to write")
    parser.add_argument("--size", type=parse_size, default=(960, 1280), help="frame size HxW (default 960x1280)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=None, help="training frames (default: all 209)")
    parser.add_argument("--n-test-good", type=int, default=None, help="clean test frames (default: all 20)")
    parser.add_argument("--n-defective", type=int, default=20, help="defective frames per kind (default 20)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated defect kinds ({', '.join(KINDS)})")
    args = parser.parse_args(argv)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    manifest = make_frames(args.bottle, args.out, args.size, args.seed, args.n_test_good, args.n_defective,
                           args.n_train, kinds)
    pixels = [d["pixels"] for f in manifest["frames"].values() for d in f["defects"]]
    print(f"wrote {args.out}: {manifest['n_train']} train, {manifest['n_test_good']} good test, "
          f"{args.n_defective} x {len(kinds)} defective frames of {args.size[0]}x{args.size[1]}; "
          f"defect areas {min(pixels)}–{max(pixels)} px (median {int(np.median(pixels))})")


if __name__ == "__main__":
    main()
