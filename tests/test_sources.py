"""Sources: folders, globs, lists of paths and video files (PyAV), and fitting from decoded frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastpadim import Padim
from fastpadim.cli.fit import fit_items
from fastpadim.errors import FastpadimError
from fastpadim.sources import Item, by_video, load, resolve
from conftest import bottle_root  # noqa: E402

BOTTLE = bottle_root() or Path("absent-bottle-data")  # conftest: beside the checkout, $FASTPADIM_BOTTLE, /work/shared


def small_images(folder: Path, n: int, size: int = 64, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        base = np.full((size, size, 3), 120, np.uint8)
        noise = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
        path = folder / f"img_{i:02d}.png"
        Image.fromarray(base + noise).save(path)
        paths.append(path)
    return paths


def write_video(path: Path, frames: list[np.ndarray], rate: int = 10) -> None:
    """A lossless FFV1 video (RGB kept exactly), the way a test camera recording would be stored."""
    av = pytest.importorskip("av", reason="PyAV is not installed (pip install 'fastpadim[video]')")
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "bgr0"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def tiny_model(**kw) -> Padim:
    params = dict(weights="random", image_size=64, crop_size=None, device="cpu", batch_size=4, holdout=0.0, workers=1)
    return Padim(**{**params, **kw})


# --------------------------------------------------------------------------------------------- images
def test_folder_glob_and_list_file_resolve_to_the_same_images(tmp_path):
    paths = small_images(tmp_path / "imgs", 4)
    (tmp_path / "imgs" / "notes.md").write_text("not an image")
    listing = tmp_path / "list.txt"
    listing.write_text("# training set\n" + "\n".join(f"imgs/{p.name}" for p in paths) + "\n\n")

    by_folder, _ = resolve(tmp_path / "imgs")
    by_glob, _ = resolve(str(tmp_path / "imgs" / "*.png"))
    by_list, _ = resolve(listing)
    expected = [str(p) for p in paths]
    assert [i.name for i in by_folder] == expected
    assert [i.name for i in by_glob] == expected
    assert [i.name for i in by_list] == expected  # relative entries are taken from the list file's folder


@pytest.mark.parametrize("source, message", [
    ("missing-folder", "no such file or folder"),
    ("nothing/*.png", "matches no image or video"),
])
def test_bad_sources_are_one_line_errors(tmp_path, source, message):
    with pytest.raises(FastpadimError, match=message):
        resolve(tmp_path / source if "*" not in source else str(tmp_path / source))


def test_an_empty_list_file_is_an_error(tmp_path):
    listing = tmp_path / "empty.txt"
    listing.write_text("# nothing yet\n")
    with pytest.raises(FastpadimError, match="list of paths is empty"):
        resolve(listing)


# ---------------------------------------------------------------------------------------------- video
@pytest.fixture(scope="module")
def bottle_frames() -> list[np.ndarray]:
    """Twelve bottle images (or generated ones where the data set is absent), at 128 px to stay quick."""
    files = sorted((BOTTLE / "train" / "good").glob("*.png"))[:12]
    if files:
        return [np.array(Image.open(f).convert("RGB").resize((128, 128), Image.Resampling.BICUBIC)) for f in files]
    rng = np.random.default_rng(1)
    return [rng.integers(0, 255, (128, 128, 3), dtype=np.uint8) for _ in range(12)]


def test_video_frames_are_named_strided_and_decoded_losslessly(tmp_path, bottle_frames):
    video = tmp_path / "line1.mkv"
    write_video(video, bottle_frames)
    items, skipped = resolve(video, frame_stride=5)
    assert not skipped
    assert [i.name for i in items] == [f"{video}#frame={k}" for k in (0, 5, 10)]
    decoded = list(load(items))
    assert [name for name, _ in decoded] == [i.name for i in items]
    for (_, frame), k in zip(decoded, (0, 5, 10)):
        np.testing.assert_array_equal(frame, bottle_frames[k])


def test_fitting_from_a_video_equals_fitting_from_its_frames(tmp_path, bottle_frames):
    video = tmp_path / "line1.mkv"
    write_video(video, bottle_frames)
    folder = tmp_path / "frames"
    folder.mkdir()
    for k, frame in enumerate(bottle_frames):
        Image.fromarray(frame).save(folder / f"{k:03d}.png")

    from_video = fit_items(tiny_model(holdout=0.25), resolve(video)[0])
    from_frames = tiny_model(holdout=0.25).fit(sorted(folder.glob("*.png")))
    assert from_video.n_samples_seen_ == from_frames.n_samples_seen_ == 9
    assert from_video.skipped_ == []
    # Same pixels in the same order and batches: the same numbers, not just close ones.
    assert torch_equal(from_video.stats_.mean, from_frames.stats_.mean)
    assert torch_equal(from_video.stats_.scatter, from_frames.stats_.scatter)
    assert from_video.threshold_ == from_frames.threshold_


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_a_truncated_video_reports_the_lost_frames_and_keeps_the_rest(tmp_path, bottle_frames):
    video = tmp_path / "cut.mkv"
    write_video(video, bottle_frames)
    items, _ = resolve(video)
    assert len(items) == 12
    data = video.read_bytes()
    video.write_bytes(data[: int(len(data) * 0.6)])  # the recording stopped while being written

    skipped = []
    decoded = list(load(items, skipped))
    assert 0 < len(decoded) < 12
    assert len(decoded) + len(skipped) == 12
    for (name, frame), k in zip(decoded, range(12)):
        assert name == f"{video}#frame={k}"
        np.testing.assert_array_equal(frame, bottle_frames[k])
    assert all(f"{video}#frame=" in reason for _, reason in skipped)


def test_an_unreadable_video_is_reported_and_the_others_kept(tmp_path, bottle_frames):
    good = tmp_path / "videos" / "a.mkv"
    good.parent.mkdir()
    write_video(good, bottle_frames[:4])
    (tmp_path / "videos" / "b.mp4").write_bytes(b"not a video at all")
    items, skipped = resolve(tmp_path / "videos")
    assert [i.name for i in items] == [f"{good}#frame={k}" for k in range(4)]
    assert len(skipped) == 1 and "b.mp4" in skipped[0][1]
    assert list(by_video(items)) == [str(good)]
    assert by_video([Item("x.png")]) == {}


def test_cli_fit_per_video_writes_one_model_per_video(tmp_path, bottle_frames):
    from typer.testing import CliRunner

    from fastpadim.cli import app
    from fastpadim.modelfile import read_model_file

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "cam1.mkv", bottle_frames[:6])
    write_video(videos / "cam2.mkv", bottle_frames[6:])
    result = CliRunner().invoke(app, [
        "fit", str(videos), "--per-video", "-o", str(tmp_path / "models"), "--weights", "random",
        "--image-size", "64", "--crop-size", "0", "--device", "cpu", "--holdout", "0", "--frame-stride", "2",
    ])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["cam1.padim", "cam2.padim"]
    for name in ("cam1", "cam2"):
        meta, _ = read_model_file(tmp_path / "models" / f"{name}.padim")
        assert meta["n_train_images"] == 3  # frames 0, 2, 4 of six


def test_cli_predict_on_a_video_names_rows_and_overlays_by_frame(tmp_path, bottle_frames):
    import json

    from typer.testing import CliRunner

    from fastpadim.cli import app

    write_video(tmp_path / "cam.mkv", bottle_frames[:6])
    model = tiny_model(holdout=0.0).fit(bottle_frames[:6])
    model.save(tmp_path / "m.padim")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "m.padim"), str(tmp_path / "cam.mkv"), "--frame-stride", "3",
                                      "-o", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["images"]
    assert [r["image"] for r in rows] == [f"{tmp_path / 'cam.mkv'}#frame={k}" for k in (0, 3)]
    assert sorted(p.name for p in (tmp_path / "out" / "overlays").iterdir()) == ["cam.mkv#frame=0.png", "cam.mkv#frame=3.png"]
    expected = model.score_images([bottle_frames[0], bottle_frames[3]])[0]
    assert [r["score"] for r in rows] == pytest.approx(expected.tolist(), rel=1e-5)
