"""``fastpadim predict``: scores, verdicts, overlays and masks for a folder of images (or Parquet parts on Ray)."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import FastpadimError
from ..files import (
    STAGING_PREFIX, OutputNames, common_root, make_output_folder, move_into_place, os_reason, previous_results,
    terminate_unwinds, write_text,
)
from ..results import check_threshold
from ..sources import inputs, resolve
from .console import progress_bar, report_skipped, say, user_errors
from .options import (
    AllowDownloadOpt, BatchSizeOpt, CpusPerTaskOpt, DeviceOpt, EngineOpt, FrameStrideOpt, MaxPixelsOpt, PrecisionOpt,
    RayOpt, WeightsOpt, apply_max_pixels,
)


RecordOpt = Annotated[Optional[str], typer.Option("--record", metavar="DB", help="Also record every verdict (and every unreadable file) in this records database: a SQLite file, or a sqlite:/// or postgresql:// URL.")]
StationOpt = Annotated[Optional[str], typer.Option("--station", help="The line PC or camera the records name (default: this host's name).")]


def predict(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Model file from 'fastpadim fit' (.padim), or its ONNX export (.onnx).")],
    source: Annotated[Path, typer.Argument(help="Images: a folder (searched recursively), an image or video, a glob, or a .txt list of paths.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for results.csv/json, overlays/ and masks/.")] = Path("out"),
    device: DeviceOpt = "auto",
    weights: WeightsOpt = None,
    allow_download: AllowDownloadOpt = False,
    threshold: Annotated[Optional[float], typer.Option(help="Override the model's image threshold.")] = None,
    maps: Annotated[Optional[bool], typer.Option("--maps/--no-maps", help="Write heatmap overlays and defect masks (default; with --ray: anomaly maps as .npy, only if asked).")] = None,
    regions: Annotated[bool, typer.Option("--regions", help="Add each image's defect regions (boxes in the image's own pixels, area, peak score) to results.json and their count to results.csv; needs a threshold.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the results of a previous run in OUTPUT (else such an OUTPUT is refused).")] = False,
    record: RecordOpt = None,
    station: StationOpt = None,
    batch_size: BatchSizeOpt = 32,
    max_pixels: MaxPixelsOpt = None,
    ray_target: RayOpt = None,
    frame_stride: FrameStrideOpt = 1,
    cpus_per_task: CpusPerTaskOpt = 1,
    engine: EngineOpt = None,
    precision: PrecisionOpt = None,
) -> None:
    """Score images: a CSV/JSON of scores and verdicts, and per image a heatmap overlay and defect mask (in the
    image's own pixels, to lay over it)."""
    from .. import load
    from ..recording import Recorder, Run, named_error, read_once, regions_of, result_row, write_maps

    with user_errors():
        threshold = check_threshold(threshold, "--threshold")
        apply_max_pixels(max_pixels)
        if station is not None and record is None:
            raise FastpadimError("--station names the station in the records: give --record DB too")
        if ray_target is not None:
            if overwrite:
                raise FastpadimError("--overwrite does not apply with --ray (a Ray run resumes what OUTPUT holds); "
                                     "give a new -o to start over")
            if regions:
                raise FastpadimError("--regions does not apply with --ray yet; score without --ray to get regions")
            if record is not None:
                raise FastpadimError("--record does not apply with --ray yet; score without --ray to record verdicts")
            return predict_on_ray(model_path, source, output, ray_target, bool(maps), threshold, frame_stride, cpus_per_task)
        maps = True if maps is None else maps
        previous = previous_results(output)
        if previous and not overwrite:
            raise FastpadimError(f"{output} already holds the results of a previous run ({', '.join(previous)}): "
                                 "give another -o, or --overwrite to replace them")
        files, skipped = resolve(source, frame_stride)
        names: list[str] = []
        unique_name = OutputNames(common_root(source, files), files)
        model = load(model_path, device=device, weights=weights, engine=engine, precision=precision,
                     allow_download=allow_download)
        if threshold is not None:
            model.threshold_ = threshold
        if regions and model.threshold_ is None:
            raise FastpadimError(f"--regions needs a threshold and {model_path} has none (fitted with --holdout 0): "
                                 "give --threshold")
        run = Run.start(model, model_path)
        recorder = None
        created = make_output_folder(output)
        try:
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output))
        except OSError as exc:
            raise FastpadimError(f"cannot write to {output}: {os_reason(exc)}") from None
        # Everything is written into the hidden staging folder and moved into OUTPUT only once the run has
        # succeeded: a failure, Ctrl+C or SIGTERM leaves OUTPUT as it was (only SIGKILL can leave the staging folder).
        # The records are the exception: they keep every verdict given, batch by batch, also of a run cut short.
        done = False
        with terminate_unwinds():
            try:
                rows = []
                recording = record is not None
                recorder = Recorder(open_records(record), run, "predict", station)
                recorder.errors(skipped)  # inputs unusable as a whole (an unreadable video)
                unreadable: list[tuple[str, str]] = []  # frames that cannot be decoded, as they are met
                digests: list[str | None] = []
                images = read_once(files, unreadable, names, digests) if recording else inputs(files, unreadable, names)
                with progress_bar("scoring", len(files)) as advance:
                    # the frame map (maps and regions in the image's pixels) comes with the kept frame
                    for batch in model.iter_scored(images, keep_view=maps or regions, progress=advance,
                                                   batch_size=batch_size):
                        for result in batch:
                            name = names[result.index]  # the path, or video.mp4#frame=N
                            digest = digests[result.index] if recording else None
                            if result.error:
                                error = named_error(result, name)
                                skipped.append((name, error))
                                recorder.add(result, name, digest, error=error)
                                continue
                            row = {**result_row(result, name, model.threshold_), **run.columns()}
                            if maps:
                                written = write_maps(result, model.threshold_, staging, unique_name(name))
                                row.update({key: str(output / value) for key, value in written.items() if value})
                            found = regions_of(result, model.threshold_) if regions else None
                            if found is not None:
                                row.update(found)
                            rows.append(row)
                            recorder.add(result, name, digest, overlay=row.get("overlay"), regions=found)
                        skipped += unreadable
                        recorder.errors(unreadable)
                        unreadable.clear()
                        recorder.flush()
                skipped += unreadable  # any met after the last batch
                recorder.errors(unreadable)
                report_skipped(skipped)
                if not rows:  # nothing to report: leave no results files (nor a folder made for them) behind
                    raise FastpadimError(f"no image could be scored ({len(skipped)} unreadable)")
                write_text(staging / "results.csv", results_csv(rows, regions))
                calibration = model.calibration_summary()
                if calibration and threshold is not None:
                    calibration["target"] = "manual"  # --threshold: the probabilities still come from the calibration
                summary = {**run.to_json(), "calibration": calibration,
                           "images": rows, "skipped": [{"image": n, "error": e} for n, e in skipped]}
                write_text(staging / "results.json", json.dumps(summary, indent=2))
                move_into_place(staging, output)
                done = True
            except FastpadimError as exc:  # name the file in OUTPUT, not its staged copy
                raise FastpadimError(str(exc).replace(str(staging), str(output))) from None
            finally:
                if recorder is not None:
                    recorder.close()
                shutil.rmtree(staging, ignore_errors=True)
                if created and not done:
                    with suppress(OSError):
                        output.rmdir()  # only if empty
        flagged = sum(r["verdict"] == "anomalous" for r in rows)
        recorded = f"; recorded {recorder.count} in {recorder.records.url}" if recording else ""
        say(f"scored {len(rows)} images ({flagged} anomalous, {len(skipped)} skipped){highest(rows)}; "
            f"wrote {output}/results.csv{recorded}")


def open_records(target: str | None):
    """The records named by --record (None without it)."""
    if target is None:
        return None
    from ..records import Records

    return Records(target)


def highest(rows: list[dict]) -> str:
    """The run's highest score in the words of the summary line ("" when there is no threshold)."""
    scored = [r for r in rows if r["normalized"] is not None]
    if not scored:
        return ""
    top = max(scored, key=lambda r: r["normalized"])
    probability = top["false_alarm_probability"]
    chance = "" if probability is None else f", p(good >= it) {probability * 100:.2g} %"
    return f"; highest score {top['normalized']:.2f}x threshold{chance}"


def results_csv(rows: list[dict], regions: bool = False) -> str:
    """One line per image; with ``regions`` a column of how many regions each image has (the boxes are in
    results.json). ``normalized`` and ``false_alarm_probability`` follow the score (empty when unknown); the run's
    time, model and threshold close each line."""
    from ..recording import csv_columns, csv_text

    counted = ({**row, "regions": len(row["regions"]) + row["regions_left_out"]} for row in rows)
    return csv_text(counted if regions else rows, csv_columns(regions))


def predict_on_ray(model_path: Path, source: Path, output: Path, ray_target: str, maps: bool,
                   threshold: float | None, frame_stride: int, cpus_per_task: float = 1) -> None:
    """``fastpadim predict --ray``: score into Parquet part files, skipping what ``output`` already holds."""
    from ..distributed import SCORES_DIR, predict_on_ray as score_on_ray, require_ray

    require_ray()
    items, unusable = resolve(source, frame_stride)
    report_skipped(unusable)
    start = time.perf_counter()
    with progress_bar("scoring", len(items), rate=True) as advance:
        counts = score_on_ray(model_path, items, output, ray_target, maps=maps, threshold=threshold,
                              root=common_root(source, items), progress=advance, cpus_per_task=cpus_per_task)
    elapsed = time.perf_counter() - start
    new = counts["scored"] + counts["errors"]
    say(f"scored {counts['scored']} images ({counts['anomalous']} anomalous, {counts['errors']} unreadable) in "
        f"{elapsed:.1f} s ({new / elapsed:.1f} images/s); {counts['already']} already in {output}; "
        f"wrote {output / SCORES_DIR}/part-*.parquet")
    if not counts["scored"] and not counts["already"]:
        raise FastpadimError("no image could be scored")
