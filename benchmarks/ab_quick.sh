#!/usr/bin/env bash
# A quick A/B in one run: the FastAPI baseline (one uvicorn worker) against slimserve with
# --workers 1 and 2, MLP 784-1024-1024-10 ONNX, 64 closed-loop clients, 8 s per row.
# Needs the models and request of benchmarks/serving.py:
#   python benchmarks/models.py --repository /tmp/bm
#   (mlp_request.json: one (1, 784) FP32 row, as benchmarks/serving.py writes it)
# Usage: benchmarks/ab_quick.sh /tmp/bm path/to/mlp_request.json
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${1:?models folder from benchmarks/models.py}
REQ=${2:?mlp_request.json}
PY=${PY:-.venv/bin/python}
REPO=$(mktemp -d)
cp -r "$MODELS/mlp-onnx" "$REPO/"
trap 'rm -rf "$REPO"' EXIT
uptime
MODEL="$MODELS/mlp-onnx/1/model.onnx" "$PY" -m uvicorn baseline_fastapi:app --app-dir benchmarks \
  --port 18500 --workers 1 --log-level warning &
BASE=$!; sleep 4
"$PY" -m slimserve bench --url http://127.0.0.1:18500 --model mlp-onnx --concurrency 64 \
  --duration 8 --warmup 2 --protocol http-json --input-file "$REQ"
kill "$BASE"; wait "$BASE" 2>/dev/null || true
for W in 1 2; do
  "$PY" -m slimserve serve --repository "$REPO" --http-port 18501 --grpc-port 18502 \
    --workers "$W" --log-level warning &
  SERVER=$!; sleep 5
  echo "slimserve --workers $W"
  "$PY" -m slimserve bench --url http://127.0.0.1:18501 --grpc-url 127.0.0.1:18502 \
    --model mlp-onnx --concurrency 64 --duration 8 --warmup 2 \
    --protocol http-json,http-binary,grpc --input-file "$REQ"
  kill -TERM "$SERVER"; wait "$SERVER" 2>/dev/null || true
done
uptime
