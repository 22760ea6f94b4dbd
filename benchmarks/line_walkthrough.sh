#!/usr/bin/env bash
# The walkthrough of docs/line.md, end to end: serve a bottle model with records, post 60 images, score 8 more and
# label two on the page (headless Chromium), label 10 more by the API, update --from-records, reload, score 15 more,
# drift, /metrics, records.
#
#   benchmarks/line_walkthrough.sh WORKDIR [DB] [KEEP] [PORT]
#
# WORKDIR gets bottle.padim (fitted on bottle's train/good when absent), the images and the records. DB is a SQLite
# file (default WORKDIR/insp.db) or a postgresql:// URL (then KEEP, a folder for kept images, is needed).
# The "new lamp" images are bottle's good test images with 1.5x contrast around mid-grey: good parts the model
# has not seen. Screenshots go to WORKDIR/shots (docs/images holds the ones of the docs).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
FP=${FP:-$REPO/.venv/bin/fastpadim}
PY=${PY:-$REPO/.venv/bin/python}
BOTTLE=${FASTPADIM_BOTTLE:-$REPO/../shared/data/mvtec_ad/bottle}
WORK=$1; DB=${2:-insp.db}; KEEP=${3:-}; PORT=${4:-8123}
mkdir -p "$WORK" && cd "$WORK"
[ -f bottle.padim ] || $FP fit "$BOTTLE/train/good" -o bottle.padim
rm -f bottle.v2.padim

# the images: 20 good, 30 defective, 10 new-lamp (first post); 3 defective + 5 new-lamp (the page); 5 more later
$PY - "$BOTTLE/test" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

test = Path(sys.argv[1])
for folder in ("first", "page", "later"):
    Path(folder).mkdir(exist_ok=True)
def copy(src, dst):
    Image.open(src).save(dst)
def lamp(src, dst):  # a new lamp: more contrast, same part
    a = np.asarray(Image.open(src).convert("RGB")).astype(float)
    Image.fromarray(np.clip((a - 128) * 1.5 + 128, 0, 255).astype(np.uint8)).save(dst)
for i in range(20):
    copy(test / f"good/{i:03d}.png", f"first/good_{i:03d}.png")
    lamp(test / f"good/{i:03d}.png", ("first" if i < 10 else "page" if i < 15 else "later") + f"/lamp_{i:03d}.png")
for kind in ("broken_large", "broken_small", "contamination"):
    for i in range(10):
        copy(test / f"{kind}/{i:03d}.png", f"first/{kind}_{i:03d}.png")
for i in range(10, 13):
    copy(test / f"broken_large/{i:03d}.png", f"page/broken_large_{i:03d}.png")
EOF

keep_opt=(); [ -n "$KEEP" ] && keep_opt=(--keep "$KEEP")
$FP serve bottle.padim --record "$DB" "${keep_opt[@]}" --port "$PORT" --no-access-log > serve.log 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null || true' EXIT
for _ in $(seq 180); do curl -s -o /dev/null "http://127.0.0.1:$PORT/health" && break; sleep 1; done
head -3 serve.log

args=(); for f in first/*.png; do args+=(-F "file=@$f"); done
curl -s "${args[@]}" "http://127.0.0.1:$PORT/v1/score/batch" | $PY -c "
import collections, json, sys
d = json.load(sys.stdin)
print('first 60:', dict(collections.Counter((r['name'].rsplit('_', 1)[0], r['verdict']) for r in d['results'])))"

$PY "$REPO/docs/screenshots.py" --url "http://127.0.0.1:$PORT/" page/*.png --false-alarm lamp_012.png \
    --defect broken_large_011.png --out shots
for id in $(curl -s "http://127.0.0.1:$PORT/v1/inspections?limit=100" | $PY -c "
import json, sys
print(' '.join(str(i['id']) for i in json.load(sys.stdin)['inspections'] if i['path'].startswith('lamp_00')))"); do
    curl -s -X POST -H 'content-type: application/json' -d '{"label": "false_alarm", "by": "anna"}' \
        "http://127.0.0.1:$PORT/v1/inspections/$id/label" > /dev/null
done

time $FP update bottle.padim --from-records "$DB"
curl -s -X POST "http://127.0.0.1:$PORT/v1/model/reload"; echo

args=(); for f in later/*.png first/good_00[0-4].png first/broken_large_00[0-4].png; do args+=(-F "file=@$f"); done
curl -s "${args[@]}" "http://127.0.0.1:$PORT/v1/score/batch" | $PY -c "
import json, sys
d = json.load(sys.stdin)
print('after reload: version', d['model_version'], [(r['name'], r['verdict'], round(r['normalized'], 2)) for r in d['results']])"
curl -s "http://127.0.0.1:$PORT/v1/drift" | $PY -c "import json, sys; d = json.load(sys.stdin); print('drift:', d['alarm'], d['reasons'])"
curl -s "http://127.0.0.1:$PORT/metrics" | grep -E '^fastpadim_(verdicts_total|model_version|drift_alarm)'
kill $SERVE; wait $SERVE 2>/dev/null || true
$FP records "$DB" --last 3
