"""``fastpadim evaluate --model``: a shipped model scored as it is (nothing refitted), its threshold's errors, and
the report's settings as the values used."""

import csv
import json
import shutil

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from fastpadim.cli import app
from fastpadim.evaluation.datasets import load_category
from fastpadim.evaluation.synthetic import make_dataset
from fastpadim.model import Padim

MODEL = dict(weights="random", n_features=8, image_size=64, crop_size=None, device="cpu", workers=1)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-model")
    make_dataset(root / "surface", n_train=8, n_test_good=3, n_test_defect=3, size=64, seed=0)
    return root


@pytest.fixture(scope="module")
def model_file(data_root, tmp_path_factory):
    """A small random-weight model with its own out-of-fold threshold (2 folds), saved as a shipped model is."""
    model = Padim(folds=2, **MODEL).fit(load_category(data_root / "surface").train)
    assert model.threshold_ is not None
    path = tmp_path_factory.mktemp("model") / "surface.padim"
    model.save(path)
    return path


def read_scores(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_model_is_scored_as_it_is_with_its_threshold(data_root, model_file, tmp_path):
    out = tmp_path / "out"
    # the MVTec root with --categories, as for a fit
    result = CliRunner().invoke(app, ["evaluate", "--model", str(model_file), str(data_root), "--categories", "surface",
                                      "-o", str(out), "--device", "cpu", "--examples", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "results.json").read_text())
    row = report["categories"][0]

    # the same image AUROC as scoring with the model directly
    category = load_category(data_root / "surface")
    model = Padim.load(model_file, device="cpu")
    direct = model.anomaly_scores([item.path for item in category.test])
    assert row["image_auroc"] == pytest.approx(roc_auc_score(category.labels, direct))
    assert row["fit_s"] is None and row["n_train"] == 8  # not refitted: the model's own training count

    rows = read_scores(out / "surface" / "scores.csv")
    assert list(rows[0]) == ["name", "label", "score", "normalized", "verdict"]
    assert len(rows) == 9 and rows[0]["name"].startswith("good/")
    assert np.allclose([float(r["score"]) for r in rows], direct, rtol=1e-5)
    threshold = model.threshold_
    assert all(r["verdict"] == ("anomalous" if float(r["score"]) > threshold else "good") for r in rows)
    assert all(float(r["normalized"]) == pytest.approx(float(r["score"]) / threshold, rel=1e-5) for r in rows)

    # the confusion matrix at the model's threshold is the CSV's verdicts counted
    confusion = row["at_model_threshold"]
    assert confusion["threshold"] == pytest.approx(threshold)
    false_alarms = sum(r["label"] == "good" and r["verdict"] == "anomalous" for r in rows)
    misses = sum(r["label"] == "anomalous" and r["verdict"] == "good" for r in rows)
    assert (confusion["false_alarms"], confusion["defects_missed"]) == (false_alarms, misses)
    assert (confusion["n_good"], confusion["n_defective"]) == (3, 6)
    assert confusion["false_alarm_rate"] == pytest.approx(false_alarms / 3)
    assert confusion["recall"] == pytest.approx(1 - misses / 6)
    assert row["at_f1_max"]["n_good"] == 3 and row["pixel_threshold"] is not None

    # the terminal and the report say both thresholds' errors and which threshold the masks use
    flat = " ".join(result.output.split())
    assert f"{false_alarms} false alarms of 3 good" in flat and f"{misses} misses of 6 anomalous" in flat
    assert "image threshold at F1-max" in flat and "pixel threshold" in flat
    markdown = (out / "report.md").read_text()
    assert "image threshold of the model" in markdown and "F1-max over all inspected pixels" in markdown
    assert "surface/scores.csv" in markdown

    # the model's own settings, as values
    settings = report["settings"]
    assert settings["model"] == str(model_file) and settings["layers"] == [1, 2, 3]
    assert settings["weights"] == "random" and settings["image_size"] == "64x64" and settings["n_features"] == 8
    assert settings["threshold"] == pytest.approx(threshold)
    assert "=None" not in markdown.split("Settings:")[1].splitlines()[0]
    assert "layers=1,2,3" in markdown and "image_size=64x64" in markdown and "crop_size=none" in markdown


def test_category_folder_and_refusals(data_root, model_file, tmp_path):
    runner = CliRunner()
    # options that set how a model is fitted are refused with --model, in one line, before anything is read
    refused = runner.invoke(app, ["evaluate", "--model", str(model_file), str(data_root / "surface"),
                                  "-o", str(tmp_path / "x"), "--image-size", "128", "--layers", "2", "--epsilon", "0.1"])
    assert refused.exit_code == 1
    assert "--layers, --image-size, --epsilon" in refused.output and "drop them" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()

    # a folder of several categories: the model is for one of them
    root = tmp_path / "two"
    for name in ("a", "b"):
        shutil.copytree(data_root / "surface", root / name)
    several = runner.invoke(app, ["evaluate", "--model", str(model_file), str(root), "-o", str(tmp_path / "y")])
    assert several.exit_code == 1 and "--categories" in several.output and "2 categories" in several.output

    # the category folder itself, scored by the model
    out = tmp_path / "out"
    result = runner.invoke(app, ["evaluate", "--model", str(model_file), str(root / "b"), "-o", str(out),
                                 "--device", "cpu", "--examples", "0"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "results.json").read_text())["categories"][0]["category"] == "b"
    assert len(read_scores(out / "b" / "scores.csv")) == 9


def test_fit_path_reports_resolved_settings(data_root, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["evaluate", str(data_root), "-o", str(out), "--weights", "random",
                                      "--n-features", "8", "--image-size", "64", "--device", "cpu", "--examples", "0"])
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "results.json").read_text())["settings"]
    # the preset's layers and the weights actually used, not the options left out (None)
    assert settings["layers"] == [1, 2, 3] and settings["weights"] == "random"
    assert settings["image_size"] == "64x64" and settings["crop_size"] == "none" and settings["device"] == "cpu"
    assert settings["epsilon"] == 0.01 and settings["blur_sigma"] == 4.0 and settings["n_features"] == 8
    line = (out / "report.md").read_text().split("Settings:")[1].splitlines()[0]
    assert "=None" not in line and "layers=1,2,3" in line
    rows = read_scores(out / "surface" / "scores.csv")
    assert len(rows) == 9 and all(r["verdict"] == "" and r["normalized"] == "" for r in rows)  # fitted without a threshold
    assert "image threshold of the model: none" in " ".join(result.output.split())


def test_onnx_export_is_evaluated_like_its_model(data_root, model_file, tmp_path):
    pytest.importorskip("onnxruntime")
    from fastpadim.export import export_onnx

    onnx_path = export_onnx(Padim.load(model_file, device="cpu"), tmp_path / "surface.onnx").onnx_path
    results = {}
    for path in (model_file, onnx_path):
        out = tmp_path / path.suffix[1:]
        result = CliRunner().invoke(app, ["evaluate", "--model", str(path), str(data_root / "surface"), "-o", str(out),
                                          "--device", "cpu", "--examples", "0"])
        assert result.exit_code == 0, result.output
        results[path.suffix] = json.loads((out / "results.json").read_text())
    padim, onnx = (results[s]["categories"][0] for s in (".padim", ".onnx"))
    assert onnx["image_auroc"] == pytest.approx(padim["image_auroc"], abs=1e-6)
    assert onnx["at_model_threshold"] == padim["at_model_threshold"]
    assert results[".onnx"]["settings"]["layers"] == [1, 2, 3]
    assert results[".onnx"]["settings"]["weights"] == results[".padim"]["settings"]["weights"]
