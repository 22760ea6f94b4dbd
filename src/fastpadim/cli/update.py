"""``fastpadim update``: more good images into a fitted model, exactly (the Gaussians of one fit on all of them):
new good images, or the operators' false alarms from the inspection records, or both."""

from __future__ import annotations

import re
import time
from itertools import chain
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import FastpadimError
from ..files import check_writable_file
from .calibrate import FromRecordsOpt, ModelNameOpt, previous_threshold, records_model_name
from .console import progress_bar, report_skipped, say, user_errors, warn
from .options import AllowDownloadOpt, BatchSizeOpt, DeviceOpt, EngineOpt, WeightsOpt

STALE = "none (stale: set for fewer images)"
NEXT_STEP = ("next: POST /v1/model/reload to a running 'fastpadim serve' of {name} (or send it SIGHUP) to serve "
             "{output}")


def update(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Model file from 'fastpadim fit' (.padim).")],
    source: Annotated[Optional[Path], typer.Argument(metavar="[NEW_GOOD]", show_default=False, help="New good images: a folder, an image or video, a glob, or a .txt list of paths (optional with --from-records).")] = None,
    from_records: FromRecordsOpt = None,
    records_name: ModelNameOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Model file to write (default: MODEL rewritten in place; with --from-records the next version beside it, e.g. bottle.v2.padim).")] = None,
    weights: WeightsOpt = None,
    allow_download: AllowDownloadOpt = False,
    device: DeviceOpt = "auto",
    engine: EngineOpt = None,
    batch_size: BatchSizeOpt = 32,
) -> None:
    """Add good images to a fitted model and set its threshold again (their out-of-fold scores join the good
    scores it came from); the model file is written atomically.

    With --from-records DB the images of the inspections that operators labelled false_alarm for this model are
    added too: those whose image is still readable and still the one labelled (its SHA-256 as recorded; others are
    skipped, with their inspection id), and not learned by an earlier update. The new model is then written beside
    MODEL as its next version (bottle.padim -> bottle.v2.padim), for 'fastpadim serve' to reload; its history
    names the inspections it learned."""
    from ..feedback import Selection, records_entry
    from ..lineage import model_name, model_version
    from ..model import Padim
    from ..sources import inputs, resolve

    with user_errors():
        if source is None and from_records is None:
            raise FastpadimError("give the new good images (NEW_GOOD), --from-records DB, or both")
        if records_name is not None and from_records is None:
            raise FastpadimError("--model-name chooses the model in the records: give --from-records DB too")
        if model_path.suffix.lower() == ".onnx":
            raise FastpadimError(f"{model_path} is an ONNX export, which holds no training statistics: update the .padim "
                                 "it was exported from, then export it again")
        if batch_size < 1:
            raise FastpadimError(f"--batch-size must be at least 1, got {batch_size}")
        if output is not None:
            check_writable_file(output)
        # names only: a bad source is refused before the model loads
        items, skipped = resolve(source) if source is not None else ([], [])
        model = Padim.load(model_path, device=device, weights=weights, allow_download=allow_download,
                           engine=engine or "torch")
        if model.stats_ is None:
            raise FastpadimError(f"{model_path} is a format-1 model file without training statistics, so it cannot "
                                 "take more images; fit it again once to make it updatable")
        if output is None:
            output = model_path if from_records is None else next_version_file(model_path, model_version(model) + 1)
            check_writable_file(output)
        feedback, database = Selection(), None
        if from_records is not None:
            feedback, database, shown = false_alarms(model, model_path, from_records, records_name)
            report_skipped(feedback.skip_lines())
            if not feedback.images:
                nothing = no_new_false_alarms(feedback, records_model_name(model_path, records_name), shown)
                if not items:
                    raise FastpadimError(f"{nothing}; {model_path} is unchanged")
                warn(nothing)
        model.batch_size = batch_size
        before, seen = previous_threshold(model), model.n_samples_seen_
        target = getattr(model, "threshold_target_", None) or ""
        # the labelled images first: the decoder names the n-th bytes "<image n>", which maps back to its inspection
        labelled = [image.data for image in feedback.images]
        total = len(labelled) + len(items)
        # the out-of-fold pass reads the new images a second time (not with folds 0)
        start = time.perf_counter()
        with progress_bar("updating", total * (2 if model.folds != 0 else 1)) as advance:
            model.partial_fit(chain(labelled, inputs(items, skipped)), progress=advance)
        elapsed = time.perf_counter() - start
        refused = undecodable_inspections(model.skipped_, feedback)
        report_skipped(skipped + [(name, f"inspection {refused[name][0]}: {reason}") if name in refused
                                  else (name, reason) for name, reason in model.skipped_])
        added = model.n_samples_seen_ - seen
        if added == 0:
            what = source if source is not None else from_records
            raise FastpadimError(f"{what}: no readable images to add; {model_path} is unchanged")
        learned = [image.id for image in feedback.images if image.id not in {id_ for id_, _ in refused.values()}]
        if database is not None:
            model.history_[-1]["records"] = records_entry(database, learned)
        model.save(output)
        from_feedback = f", {len(learned)} of them labelled false alarms" if from_records is not None else ""
        say(f"updated {output}: added {added} images ({model.n_samples_seen_} in all){from_feedback} in "
            f"{elapsed:.1f} s; version {model_version(model)}; threshold {new_threshold(model)} (was {before})")
        if new_threshold(model) == STALE:
            warn("the model has no out-of-fold calibration (fitted with --folds 0), so its threshold no longer "
                 f"matches the Gaussians: set it again (fastpadim set-threshold {output} --good FOLDER)")
            return
        if target.startswith(("recall=", "f1", "manual")):
            how = "by hand" if target == "manual" else f"for {target} on labelled images"
            warn(f"the threshold was set {how}; it was re-set from good images only, for a false-alarm rate of "
                 f"{model.threshold_rate_:g}: run 'fastpadim calibrate {output} --good ... --defective ...' again")
        if model.threshold_ is not None and not getattr(model, "threshold_extrapolated_", False):
            from ..results import threshold_caveat

            caveat = threshold_caveat(model.threshold_rate_, getattr(model, "threshold_count_", None))
            if caveat:
                warn(caveat)
        if is_version_of(output, model_path):  # a service reloads only the version files beside its model
            say(NEXT_STEP.format(name=model_name(model_path), output=output))


def false_alarms(model, model_path: Path, target: str, name: str | None):
    """The false alarms of the model in the records that it has not learned yet: (selection, the database as the
    history names it, the database as messages show it)."""
    from ..feedback import database_name, labelled_images, learned_inspections
    from ..records import Records

    with Records(target, create=False) as records:  # reading never creates an empty database
        database = database_name(target, records.url)
        learned = learned_inspections(model.history_, database)
        selection = labelled_images(records, "false_alarm", records_model_name(model_path, name), learned)
        return selection, database, records.url


def no_new_false_alarms(selection, name: str, shown: str) -> str:
    """Why nothing is learned from the records, in words."""
    why = []
    if selection.learned_before:
        why.append(f"{selection.learned_before} learned by an earlier update")
    if selection.skipped:
        why.append(f"{len(selection.skipped)} without their image as labelled")
    return f"no new false alarms of model {name!r} in {shown} to learn ({', '.join(why) or 'none is labelled'})"


def next_version_file(model_path: Path, version: int) -> Path:
    """Where the next version goes (bottle.v2.padim): never over an existing file, which is another model."""
    from ..lineage import versioned_path, versions

    path = versioned_path(model_path, version)
    if path.exists():
        newest = max(versions(model_path).items())
        raise FastpadimError(f"{path} exists already (version {version} of this model): update the newest version "
                             f"({newest[1]}), or name the new file with -o")
    return path


def is_version_of(path: Path, model_path: Path) -> bool:
    """Whether ``path`` is a version file of the model in ``model_path`` (same folder, same name)."""
    from ..lineage import model_name

    return (path.suffix == model_path.suffix and model_name(path) == model_name(model_path)
            and path.resolve().parent == model_path.resolve().parent)


_BYTES_NAME = re.compile(r"^<image (\d+)>$")


def undecodable_inspections(skipped: list, feedback) -> dict[str, tuple[int, str]]:
    """Labelled images the decoder refused (by its name ``<image n>``, n their position first in the inputs):
    name → (inspection id, reason)."""
    found = {}
    for name, reason in skipped:
        match = _BYTES_NAME.match(str(name))
        if match and int(match[1]) < len(feedback.images):
            found[name] = (feedback.images[int(match[1])].id, reason)
    return found


def new_threshold(model) -> str:
    """The threshold after the update and what it rests on, e.g. ``12.1 for fpr=0.01 from 24 good scores``."""
    try:
        value = model.threshold_
    except FastpadimError:
        return STALE
    if value is None:
        return "none"
    line = f"{value:.6g} for {getattr(model, 'threshold_target_', None) or f'fpr={model.threshold_rate_:g}'}"
    if getattr(model, "threshold_count_", None):
        line += f" from {model.threshold_count_} good scores"
    return line + (", extrapolated by the tail model" if getattr(model, "threshold_extrapolated_", False) else "")
