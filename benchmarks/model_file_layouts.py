"""Model file layouts side by side: size and load time of the old factor file (format 1, with and without its
float64 statistics) and of format 2 (packed float32 statistics, factored at load), for one fitted model.

    .venv/bin/python benchmarks/model_file_layouts.py            # default backbone on bottle train/good
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import BOTTLE, train_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=BOTTLE)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from fastpadim import Padim
    from fastpadim.modelfile import write_model_file

    model = Padim(folds=0).fit(train_files(args.data))
    print(f"{model.n_samples_seen_} images, P = {model.positions_}, D = {model.channel_indices_.numel()}; "
          f"load {os.getloadavg()[0]:.1f}")
    stats = model.stats_.widened()  # float64, as format 1 kept them with --keep-stats
    old = {**model.to_metadata(), "format_version": 1}
    for key in ("calibration", "history", "folds"):
        old.pop(key)
    factor = {"mean": model.mean_, "whitener": model.whitener_, "channel_indices": model.channel_indices_}
    with tempfile.TemporaryDirectory() as folder:
        layouts = {
            "format 1 (factor)": (Path(folder) / "v1.padim", lambda p: write_model_file(p, old, factor)),
            "format 1 --keep-stats": (Path(folder) / "v1s.padim", lambda p: write_model_file(
                p, old, {**factor, "stats.mean": stats.mean, "stats.scatter": stats.scatter})),
            "format 2 (statistics)": (Path(folder) / "v2.padim", model.save),
        }
        print(f"{'layout':<24} {'file MB':>9} {'load s':>7} {'updatable':>9}")
        for name, (path, write) in layouts.items():
            write(path)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                loaded = Padim.load(path, device="cpu")
                times.append(time.perf_counter() - start)
            print(f"{name:<24} {path.stat().st_size / 1e6:>9.1f} {statistics.median(times):>7.2f} "
                  f"{'yes' if loaded.stats_ is not None else 'no':>9}")
            path.unlink()


if __name__ == "__main__":
    main()
