"""Peak memory of one Ray fit task per backbone preset (docs/scaling.md).

Runs the task's own function, ``fastpadim.distributed.fit_shard``, in this process on a few images with
random weights (the statistics' shapes, not the weights, set the memory) and prints the peak RSS.
Run one preset per fresh process:  python benchmarks/ray_worker_memory.py wide_resnet50_2 [8] [FOLDER]
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BOTTLE, peak_rss_mb  # noqa: E402

from fastpadim import Padim
from fastpadim.distributed import fit_shard, model_params
from fastpadim.images import list_images
from fastpadim.sources import Item

preset_name = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 8
folder = Path(sys.argv[3]) if len(sys.argv) > 3 else BOTTLE / "train/good"
paths = list_images(folder)[:n]
model = Padim(backbone=preset_name, weights="random", device="cpu", batch_size=8, crop_size=224)  # as in docs/scaling.md
model.prepare()  # as the driver does: draws the channel subset
channels, params = model.channel_indices_, model_params(model)
del model
start = time.perf_counter()
result = fit_shard(params, channels, [Item(str(p)) for p in paths], 0)
positions, dim = result["mean"].shape
print(f"{preset_name}: D={dim} P={positions} packed scatter {result['scatter'].nbytes / 1e9:.2f} GB; "
      f"peak RSS {peak_rss_mb() * 2**20 / 1e9:.2f} GB; {len(paths)} images in {time.perf_counter() - start:.1f} s")
