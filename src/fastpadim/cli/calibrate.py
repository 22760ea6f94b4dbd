"""``fastpadim calibrate``: a threshold for a target (false-alarm rate, recall, F1) from labelled images: folders of
good and defective images, or the operators' labels in the inspection records, or both."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import FastpadimError
from .console import out, progress_bar, report_skipped, user_errors, warn
from .options import AllowDownloadOpt, BatchSizeOpt, DeviceOpt, EngineOpt, PrecisionOpt, WeightsOpt

FromRecordsOpt = Annotated[Optional[str], typer.Option("--from-records", metavar="DB", help="The inspection records (a SQLite file, or a sqlite:/// or postgresql:// URL) whose labelled inspections of this model are used; an image is used only while it is unchanged since its verdict (same SHA-256).")]
ModelNameOpt = Annotated[Optional[str], typer.Option("--model-name", help="With --from-records: the model's name in the records (default: MODEL's file name without its version, e.g. bottle for bottle.v2.padim).")]


def calibrate(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Model file (.padim or .onnx); its threshold is rewritten in place.")],
    good: Annotated[Optional[Path], typer.Option("--good", help="Good images the model did not learn from (a folder, an image, a glob or a list file); optional with --from-records.")] = None,
    defective: Annotated[Optional[Path], typer.Option("--defective", help="Defective images (a folder, an image, a glob or a list file); optional with --from-records.")] = None,
    from_records: FromRecordsOpt = None,
    records_name: ModelNameOpt = None,
    target: Annotated[Optional[str], typer.Option("--target", help="fpr=R (at most R of good images flagged), recall=R (at least R of defects caught) or f1 (the best F1); default: fpr at the model's false-alarm rate.")] = None,
    weights: WeightsOpt = None,
    allow_download: AllowDownloadOpt = False,
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = 32,
    engine: EngineOpt = None,
    precision: PrecisionOpt = None,
) -> None:
    """Set a model's threshold for a target from labelled good and defective images (no refit), show the
    result on them, and write the threshold into the model file.

    With --from-records DB, the inspections of this model that operators labelled are labelled images too:
    false_alarm ones good, confirmed_defect ones defective (each image only while unchanged since its verdict;
    others are skipped with their inspection id). Only flagged parts get labelled false alarms, so they are no
    sample of good parts on their own: the good side keeps the good scores the model already holds (from its fit,
    out of fold, or an earlier calibrate, each image counted once) and adds the false alarms and --good to them.
    recall and f1 need at least one defective image (confirmed_defect or --defective)."""
    from ..targets import apply_choice, choose_threshold, parse_target

    with user_errors():
        if from_records is None:
            for value, option in ((good, "--good"), (defective, "--defective")):
                if value is None:
                    raise FastpadimError(f"give {option} FOLDER (labelled images), or --from-records DB (the "
                                         "operators' labels)")
            if records_name is not None:
                raise FastpadimError("--model-name chooses the model in the records: give --from-records DB too")
        wanted = parse_target(target) if target is not None else None  # a bad target before any work
        model = load_model(model_path, device, weights, engine, precision, allow_download, batch_size)
        check_write_back(model, model_path)  # before the images are scored
        if wanted is None:
            wanted = parse_target(f"fpr={model.threshold_rate_ or model.false_alarm_rate:g}")
        before = previous_threshold(model)
        labels = (operators_labels(model, model_path, from_records, records_name) if from_records is not None
                  else None)
        good_scores = labelled_scores(model, good, "good") if good is not None else []
        defective_scores = labelled_scores(model, defective, "defective") if defective is not None else []
        report_skipped(model.skipped_)
        if labels is not None:
            false_alarms, defects, shown = labels
            alarm_scores = inspection_scores(model, false_alarms, "false alarms")
            defective_scores += inspection_scores(model, defects, "confirmed defects")
            good_scores = known_good_scores(model, good_scores + alarm_scores) + good_scores + alarm_scores
            check_enough(wanted, good_scores, defective_scores, shown, records_model_name(model_path, records_name))
        choice = choose_threshold(wanted, good_scores, defective_scores)
        apply_choice(model, choice, good_scores)
        write_back(model, model_path)
        for line in choice_lines(choice, before, model_path):
            out.print(line, highlight=False, soft_wrap=True)
        if choice.target.kind == "fpr" and not choice.extrapolated:
            from ..results import threshold_caveat

            caveat = threshold_caveat(choice.target.rate, len(good_scores))
            if caveat:
                warn(caveat)


def records_model_name(model_path: Path, name: str | None) -> str:
    """The model's name in the records: --model-name, else the file's (bottle for bottle.v2.padim)."""
    from ..lineage import model_name

    return name if name is not None else model_name(model_path)


def operators_labels(model, model_path: Path, target: str, name: str | None):
    """The usable false alarms and confirmed defects of the model in the records (``feedback.Selection`` each),
    the unusable ones reported; and the records as messages show them. False alarms an update already learned
    are left out: their leave-one-out scores are in the model's calibration already (their in-sample scores
    would be too low)."""
    from ..feedback import database_name, labelled_images, learned_inspections
    from ..records import Records

    name = records_model_name(model_path, name)
    with Records(target, create=False) as records:  # reading never creates an empty database
        learned = learned_inspections(getattr(model, "history_", None), database_name(target, records.url))
        false_alarms = labelled_images(records, "false_alarm", name, learned)
        defects = labelled_images(records, "confirmed_defect", name)
        shown = records.url
    report_skipped(false_alarms.skip_lines() + defects.skip_lines())
    return false_alarms, defects, shown


def inspection_scores(model, selection, kind: str) -> list[float]:
    """Scores of the checked images of labelled inspections; one the decoder refuses is reported by its id."""
    if not selection.images:
        return []
    skipped: list = []
    with progress_bar(f"scoring {kind}", len(selection.images)) as advance:
        scores = model.readable_scores([image.data for image in selection.images], advance, skipped)
    # bytes are named by their position, "<image n>"
    by_name = {f"<image {i}>": image.id for i, image in enumerate(selection.images)}
    report_skipped([(name, f"inspection {by_name.get(name, name)}: {reason}") for name, reason in skipped])
    return scores


def known_good_scores(model, labelled: list[float]) -> list[float]:
    """The good scores the model holds (its calibration), less those of these labelled images (put there by an
    earlier calibrate with the same labels)."""
    from ..feedback import counted_once

    calibration = getattr(model, "calibration_", None)
    if calibration is None:
        return []
    return counted_once(calibration.scores, labelled).tolist()


def check_enough(wanted, good: list[float], defective: list[float], shown: str, name: str) -> None:
    """One line when the labels cannot set the target: no good score at all, or no defect for recall/f1."""
    if not good:
        raise FastpadimError(f"no good images to calibrate with: the model holds no good scores, no false alarm of "
                             f"model {name!r} in {shown} is usable, and no --good was given")
    if wanted.labelled and not defective:
        raise FastpadimError(f"target {wanted} needs defective images: no confirmed defect of model {name!r} in "
                             f"{shown} is usable, and no --defective was given")


def load_model(path: Path, device: str, weights, engine, precision, allow_download: bool, batch_size: int = 32):
    """A .padim (PyTorch) or .onnx (onnxruntime/OpenVINO) model, with its scoring batch size."""
    from .. import load

    if batch_size < 1:
        raise FastpadimError(f"--batch-size must be at least 1, got {batch_size}")
    model = load(path, device=device, weights=weights, engine=engine, precision=precision, allow_download=allow_download)
    model.batch_size = batch_size
    return model


def check_write_back(model, path: Path) -> None:
    """Refuse up front what ``write_back`` could not write: a read-only file, a format-1 .padim without statistics."""
    from ..files import check_writable_file

    check_writable_file(path)
    if hasattr(model, "save_metadata") and Path(model.path).resolve() != Path(path).resolve():
        # a .padim scored through its cached ONNX export: the threshold belongs in the .padim, not in the cache
        raise FastpadimError(f"{path}: the threshold is written into the .padim file, which --engine {model.engine} "
                             "does not run; calibrate it with --engine torch (the default)")
    if not hasattr(model, "save_metadata") and model.stats_ is None:
        raise FastpadimError(f"{path} is a format-1 model file without training statistics; fastpadim cannot write it "
                             "again: fit it again once (or set a threshold by value: fastpadim set-threshold MODEL VALUE)")


def write_back(model, path: Path) -> None:
    """The new threshold into the model file, atomically: an ONNX export's metadata is rewritten (the graph and
    its data file stay), a .padim is saved again (it holds nothing the loaded model does not)."""
    if hasattr(model, "save_metadata"):
        model.save_metadata()
    else:
        model.save(path)


def labelled_scores(model, source: Path, kind: str) -> list[float]:
    """Scores of the images in ``source`` (unreadable ones go to ``model.skipped_``); one line if none is left."""
    from ..sources import inputs, resolve

    items, skipped = resolve(source)
    with progress_bar(f"scoring {kind} images", len(items)) as advance:
        scores = model.readable_scores(inputs(items, skipped), advance, skipped)
    model.skipped_ += skipped
    if not scores:
        raise FastpadimError(f"{source}: no readable {kind} images to calibrate with")
    return scores


def previous_threshold(model) -> str:
    """The threshold a model holds now and what it was set for, e.g. ``11.2 for fpr=0.01``."""
    try:
        value = model.threshold_
    except FastpadimError:
        return "stale"
    if value is None:
        return "none"
    target = getattr(model, "threshold_target_", None)
    return f"{value:.6g} for {target}" if target else f"{value:.6g}"


def choice_lines(choice, before: str, model_path: Path) -> list[str]:
    """The threshold and the confusion matrix of the labelled images at it, in three lines."""
    matrix = choice.confusion
    extrapolated = ", extrapolated by the tail model" if choice.extrapolated else ""
    lines = [f"threshold {choice.threshold:.6g} for {choice.target}{extrapolated} (was {before}); wrote {model_path}",
             f"good images  {matrix.good_passed} passed, {matrix.false_alarms} false alarms "
             f"(false-alarm rate {percent(matrix.false_alarm_rate)} of {matrix.n_good})"]
    if matrix.n_defective:
        lines.append(f"defects      {matrix.defects_caught} caught, {matrix.defects_missed} missed "
                     f"(recall {percent(matrix.recall)} of {matrix.n_defective}; F1 {matrix.f1:.3f})")
    return lines


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"
