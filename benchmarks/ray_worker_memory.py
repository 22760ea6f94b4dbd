"""Peak memory of one Ray fit task per backbone preset (docs/scaling.md).

Runs the task's own function, ``fastpadim.distributed.fit_shard``, in this process on a few images with
random weights (the statistics' shapes, not the weights, set the memory) and prints the peak RSS.
Run one preset per fresh process:  python benchmarks/ray_worker_memory.py wide_resnet50_2 [8] [FOLDER]
"""

import resource
import sys
import time
from pathlib import Path

from fastpadim import Padim
from fastpadim.backbone import resolve_preset
from fastpadim.distributed import fit_shard, model_params
from fastpadim.images import list_images
from fastpadim.sources import Item

preset_name = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 8
folder = Path(sys.argv[3]) if len(sys.argv) > 3 else Path(__file__).resolve().parents[2] / "shared/data/mvtec_ad/bottle/train/good"
paths = list_images(folder)[:n]
model = Padim(backbone=preset_name, weights="random", device="cpu", batch_size=8)
preset = resolve_preset(preset_name, None, None)
model._build(preset)  # as the driver does: draws the channel subset
channels, params = model.channel_indices_, model_params(model)
del model
start = time.perf_counter()
result = fit_shard(params, preset, channels, [Item(str(p)) for p in paths], 0)
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
positions, dim = result["mean"].shape
print(f"{preset_name}: D={dim} P={positions} packed scatter {result['scatter'].nbytes / 1e9:.2f} GB; "
      f"peak RSS {peak_mb / 1e3:.2f} GB; {len(paths)} images in {time.perf_counter() - start:.1f} s")
