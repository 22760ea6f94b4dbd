"""Fit time and peak RSS against the number of training images N, for fastpadim and anomalib's PaDiM.

Training images are made on the fly from the bottle training images (flips, rotations, then small shifts;
see common.synthetic_train), so neither implementation holds the images themselves: what grows with N is
the implementation's own state. Each (implementation, N) is one fresh subprocess.

anomalib keeps every embedding until its fit (256 px: 64x64 positions x 176 channels x 4 bytes = 2.9 MB per
image), so it is only run up to --anomalib-max-n; larger N are reported as not run, with the memory that
its embedding bank alone would need.

    python benchmarks/scaling.py --ns 50,200,1000,5000 --anomalib-max-n 1000
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import bench_parser  # noqa: E402
from compare_anomalib import ROOT, run_worker  # noqa: E402


def bank_gb(n: int, size: int, channels: int = 176) -> float:
    side = size // 4  # blocks.1 has stride 4
    return n * channels * side * side * 4 / 1e9


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--ns", default="50,200,1000,5000")
    parser.add_argument("--impls", default="fastpadim,anomalib")
    parser.add_argument("--anomalib-max-n", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed for one (implementation, N)")
    parser.add_argument("--anomalib-python", type=Path, default=ROOT / ".venv-anomalib" / "bin" / "python")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench-scaling")
    args = parser.parse_args()

    rows = []
    for n in (int(s) for s in args.ns.split(",")):
        for impl in args.impls.split(","):
            if impl == "anomalib" and n > args.anomalib_max_n:
                note = (f"not run: its embedding bank alone would be {bank_gb(n, args.size):.1f} GB "
                        f"(vstack copies it once more) on a 24 GB machine shared with other work")
                print(f"  anomalib --n {n}: {note}", flush=True)
                rows.append({"impl": impl, "n": n, "note": note})
                continue
            result = run_worker(impl, "scaling", args.out / impl / str(n), args,
                                ["--size", str(args.size), "--n", str(n)], timeout=args.timeout)
            rows.append(result or {"impl": impl, "n": n, "note": "failed or timed out (see above)"})
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "scaling.json").write_text(json.dumps(rows, indent=2))

    print(f"\n### fit time and peak RSS vs N ({args.size}x{args.size}, all 176 channels)\n")
    print("| N | fastpadim fit (s wall / s CPU) | fastpadim peak RSS (MB) | anomalib fit (s wall / s CPU) "
          "| anomalib peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for n in sorted({r["n"] for r in rows}):
        cells = []
        for impl in ("fastpadim", "anomalib"):
            r = next((r for r in rows if r["n"] == n and r["impl"] == impl), None)
            if r is None:
                cells += ["-", "-"]
            elif "fit_s" in r:
                cells += [f"{r['fit_s']:.1f} / {r['fit_cpu_s']:.1f}", f"{r['peak_rss_fit_mb']:.0f}"]
            else:
                cells += [r["note"], "-"]
        print(f"| {n} | " + " | ".join(cells) + " |")
    print(f"\nraw results: {args.out / 'scaling.json'}")


if __name__ == "__main__":
    main()
