"""Accuracy, time and memory on rectangular high-resolution frames with small faint defects, per configuration.

The frames come from ``high_res_frames.py`` (bottle images upscaled onto a white 4:3 canvas, 960x1280 by default,
with 3–6 px spots, specks and 1–2 px scratches and exact masks); they are generated under /tmp when --data does not
hold them yet. Each configuration is one fresh ``fastpadim evaluate`` process (fit on the 209 training frames,
score the 80 test frames, compute the metrics), so its figures include decoding the large PNGs:

- image AUROC, pixel AUROC, PRO (FPR ≤ 0.3), image F1-max: from its results.json;
- fit s and scoring images/s: as ``fastpadim evaluate`` measures them (fit = fit on the training frames; images/s
  = test frames per second of scoring);
- wall s: the whole process (imports, fit, scoring, metrics, report);
- peak RSS: the process's ``ru_maxrss`` from ``os.wait4`` (its whole life, children included; an upper bound that
  may include this small runner's own RSS at the fork, reported as ``runner_rss_mb``).

Pixel metrics are taken at the frames' own resolution: ``fastpadim evaluate`` puts each anomaly map back in its
frame's pixels and compares it with the mask at its own size, so a 1–2 px scratch counts as the pixels it has.

Configurations are named (see CONFIGS, ``--list``); ``{H}`` and ``{W}`` stand for the frames' height and width.
A configuration whose options this fastpadim lacks is reported as skipped. Custom ones: ``--configs
'mine=--image-size 640x480 -d 80'``. ::

    python benchmarks/high_resolution.py --configs 256-squash,full,full-d100,tile320
    python benchmarks/high_resolution.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import peak_rss_mb
from high_res_frames import make_frames, parse_size

CONFIGS: dict[str, list[str]] = {
    "256-squash": ["--image-size", "256", "--squash"],      # the default size, the 4:3 frame squashed to a square
    "512-squash": ["--image-size", "512", "--squash"],
    "1024-squash": ["--image-size", "1024", "--squash"],
    "full": ["--image-size", "{H}x{W}"],                     # the frame's own pixels, aspect kept
    "full-d100": ["--image-size", "{H}x{W}", "-d", "100"],
    "full-pool2": ["--image-size", "{H}x{W}", "--pool", "2"],
    "full-fp16": ["--image-size", "{H}x{W}", "--factor-dtype", "float16"],
    "full-d100-pool2-fp16": ["--image-size", "{H}x{W}", "-d", "100", "--pool", "2", "--factor-dtype", "float16"],
    # the first two levels only (strides 4 and 8, 64 channels): finer features, a third of the paper's D
    "full-l12": ["--image-size", "{H}x{W}", "--layers", "1,2"],
    "full-l12-s1": ["--image-size", "{H}x{W}", "--layers", "1,2", "--blur-sigma", "1"],
    "full-l12-s1-fp16": ["--image-size", "{H}x{W}", "--layers", "1,2", "--blur-sigma", "1", "--factor-dtype", "float16"],
    # a larger covariance regularisation (these upscaled frames vary little between good parts)
    "full-l12-s1-e1": ["--image-size", "{H}x{W}", "--layers", "1,2", "--blur-sigma", "1", "--epsilon", "1"],
    "full-l12-s1-e10": ["--image-size", "{H}x{W}", "--layers", "1,2", "--blur-sigma", "1", "--epsilon", "10"],
    "full-d100-e10": ["--image-size", "{H}x{W}", "-d", "100", "--epsilon", "10"],
    "tile320-l12-s1": ["--image-size", "{H}x{W}", "--layers", "1,2", "--blur-sigma", "1", "--tile", "320"],
    "tile320": ["--image-size", "{H}x{W}", "-d", "100", "--tile", "320"],
}
DEFAULT_CONFIGS = "256-squash,full-d100,full-pool2,full-l12,full-l12-s1,tile320-l12-s1"
FIELDS = ("image_auroc", "pixel_auroc", "pro", "image_f1_max", "fit_s", "images_per_s")


def parse_configs(text: str) -> list[tuple[str, list[str]]]:
    """'a,b,name=--opt value ...' → [(name, args)]; a custom entry runs to the next comma."""
    chosen = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" in part:
            name, _, args = part.partition("=")
            chosen.append((name.strip(), shlex.split(args)))
        elif part in CONFIGS:
            chosen.append((part, CONFIGS[part]))
        else:
            raise SystemExit(f"unknown configuration {part!r}; known: {', '.join(CONFIGS)} (or NAME='--opt ...')")
    return chosen


def known_options(fastpadim: Path) -> set[str]:
    """The long and short options ``fastpadim evaluate --help`` lists."""
    text = subprocess.run([str(fastpadim), "evaluate", "--help"], check=False, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}).stdout
    return set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", text))


def frame_size(data: Path) -> tuple[int, int]:
    manifest = data / "defects.json"
    if manifest.is_file():
        height, width = json.loads(manifest.read_text())["size_hw"]
        return height, width
    from PIL import Image

    first = next(p for p in sorted((data / "train").rglob("*.png")))
    with Image.open(first) as image:
        return image.height, image.width


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def run_config(name: str, args: list[str], data: Path, out: Path, opts, timeout: float) -> dict:
    """One fresh ``fastpadim evaluate`` process; its metrics, times and peak RSS."""
    folder = out / name
    command = [str(opts.fastpadim), "evaluate", str(data), "-o", str(folder), "--device", opts.device,
               "--examples", "0", *args]
    record: dict = {"config": name, "args": args, "command": shlex.join(command),
                    "load_before": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"\n$ {record['command']}", flush=True)
    log = (out / f"{name}.log").open("w")
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "120"})
    deadline = start + timeout
    status, rusage = 0, None
    while True:
        pid, status, rusage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            process.kill()
            _, status, rusage = os.wait4(process.pid, 0)
            record["note"] = f"timed out after {timeout:.0f} s"
            break
        time.sleep(0.2)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    log.close()
    record["wall_s"] = time.perf_counter() - start
    record["cpu_s"] = rusage.ru_utime + rusage.ru_stime
    record["peak_rss_mb"] = rusage.ru_maxrss / 1024
    record["returncode"] = process.returncode
    results = folder / "results.json"
    if process.returncode == 0 and results.is_file():
        payload = json.loads(results.read_text())
        row = payload["categories"][0]
        record.update({k: row.get(k) for k in (*FIELDS, "n_train", "n_test", "notes")})
        record["settings"] = payload["settings"]
    else:
        record.setdefault("note", f"failed (exit {process.returncode}); see {out / (name + '.log')}")
        tail = (out / f"{name}.log").read_text().strip().splitlines()[-5:]
        print("\n".join("  " + line for line in tail), flush=True)
    print(f"  {name}: " + ", ".join(f"{k}={_fmt(record.get(k))}" for k in (*FIELDS, "wall_s", "peak_rss_mb")),
          flush=True)
    return record


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(records: list[dict], data: Path, size: tuple[int, int]) -> str:
    lines = [f"### {data.name}: {size[0]}x{size[1]} frames (H x W), fastpadim evaluate per configuration", "",
             ("| config | options | image AUROC | pixel AUROC | PRO | image F1 | fit s | images/s | wall s "
              "| peak RSS MB | note |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append("| " + " | ".join([
            r["config"], "`" + " ".join(r["args"]) + "`", _fmt(r.get("image_auroc")), _fmt(r.get("pixel_auroc")),
            _fmt(r.get("pro")), _fmt(r.get("image_f1_max")), _fmt(r.get("fit_s"), 1), _fmt(r.get("images_per_s"), 2),
            _fmt(r.get("wall_s"), 1), _fmt(r.get("peak_rss_mb"), 0), r.get("note", ""),
        ]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/tmp/hires/bottle_hr"),
                        help="the frame set (a category folder); generated there first when it has no defects.json")
    parser.add_argument("--bottle", type=Path, default=None, help="source for generating (default: common.BOTTLE)")
    parser.add_argument("--size", type=parse_size, default=(960, 1280), help="frame size HxW when generating")
    parser.add_argument("--seed", type=int, default=0, help="generator seed when generating")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help=f"comma-separated names ({', '.join(CONFIGS)}) or NAME='--opt ...'")
    parser.add_argument("--list", action="store_true", help="print the named configurations and exit")
    parser.add_argument("--device", default="cpu", help="passed to fastpadim evaluate (default cpu)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed for one configuration")
    parser.add_argument("--fastpadim", type=Path, default=Path(sys.executable).parent / "fastpadim",
                        help="the fastpadim command (default: beside this Python)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench-high-resolution")
    opts = parser.parse_args(argv)
    if opts.list:
        for name, args in CONFIGS.items():
            print(f"{name:24s} {' '.join(args)}")
        return

    if not (opts.data / "defects.json").is_file():
        print(f"generating {opts.data} ({opts.size[0]}x{opts.size[1]}, seed {opts.seed}) ...", flush=True)
        kwargs = {"bottle_root": opts.bottle} if opts.bottle else {}
        make_frames(out_root=opts.data, size=opts.size, seed=opts.seed, **kwargs)
    height, width = frame_size(opts.data)
    opts.out.mkdir(parents=True, exist_ok=True)
    available = known_options(opts.fastpadim)
    records = []
    for name, args in parse_configs(opts.configs):
        args = [a.replace("{H}", str(height)).replace("{W}", str(width)) for a in args]
        missing = [a for a in args if a.startswith("-") and a not in available]
        if missing:
            note = f"skipped: this fastpadim evaluate has no {', '.join(missing)}"
            print(f"\n{name}: {note}", flush=True)
            records.append({"config": name, "args": args, "note": note})
        else:
            records.append(run_config(name, args, opts.data, opts.out, opts, opts.timeout))
        payload = {"data": str(opts.data), "size_hw": [height, width], "machine": {
            "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu_model(), "avx512_bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text()},
            "runner_rss_mb": peak_rss_mb(), "records": records}
        (opts.out / "high_resolution.json").write_text(json.dumps(payload, indent=2))
    print()
    table = markdown(records, opts.data, (height, width))
    (opts.out / "high_resolution.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {opts.out / 'high_resolution.json'} and high_resolution.md")


if __name__ == "__main__":
    main()
