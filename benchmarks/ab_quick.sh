#!/usr/bin/env bash
# Issue 2's serving targets in one run (~4 minutes), every ratio from this run:
#   MLP 784-1024-1024-10 ONNX, 64 closed-loop clients, 8 s per row: the FastAPI baseline (one
#   uvicorn worker); slimserve with its defaults, with --intra-op-threads 1, and with
#   --grpc-server grpcio; gRPC also from grpc.aio's client and from h2load (if installed:
#   apt-get install nghttp2-client); then MiniLM: in-process best batch (1 and 2 threads,
#   OpenMP spinning and sleeping) and slimserve at 16 clients, with its defaults (threads
#   sleep) and with --spin-wait (threads spin, as in the in-process best).
# Needs the models and request of benchmarks/serving.py:
#   python benchmarks/models.py --repository /tmp/bm
#   (mlp_request.json: one (1, 784) FP32 row, as benchmarks/serving.py writes it)
# Usage: benchmarks/ab_quick.sh /tmp/bm path/to/mlp_request.json [--no-minilm]
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${1:?models folder from benchmarks/models.py}
REQ=${2:?mlp_request.json}
MINILM=${3:-}
PY=${PY:-.venv/bin/python}
REPO=$(mktemp -d)
cp -r "$MODELS/mlp-onnx" "$REPO/"
trap 'rm -rf "$REPO"' EXIT
BENCH=("$PY" -m slimserve bench --duration 8 --warmup 2)
wait_ready() { for _ in $(seq 100); do curl -sf "$1" >/dev/null && return; sleep 0.2; done; }
stop() { kill -TERM "$1"; wait "$1" 2>/dev/null || true; }
echo "# $(date -u +%FT%TZ) $(uptime)"
grep -o -w -E 'avx512f|avx512_vnni|avx512_bf16|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' '; echo

MODEL="$MODELS/mlp-onnx/1/model.onnx" "$PY" -m uvicorn baseline_fastapi:app --app-dir benchmarks \
  --port 18500 --workers 1 --log-level warning &
BASE=$!; sleep 4
echo "## FastAPI baseline"
"${BENCH[@]}" --url http://127.0.0.1:18500 --model mlp-onnx --concurrency 64 \
  --protocol http-json --input-file "$REQ"
stop "$BASE"

# The gRPC request as h2load sends it: the 5-byte gRPC prefix and the serialized message.
GRPC_BODY="$REPO/grpc_body.bin"
"$PY" - "$REQ" "$GRPC_BODY" <<'PYEOF'
import struct, sys
from pathlib import Path
from slimserve.bench import payload as pl
message = pl.grpc_request(pl.from_request_file(Path(sys.argv[1])), "mlp-onnx")
Path(sys.argv[2]).write_bytes(b"\0" + struct.pack(">I", len(message)) + message)
PYEOF
H2LOAD=(h2load -D 8 -c 4 -m 16 -d "$GRPC_BODY" -H "content-type: application/grpc" -H "te: trailers")

for EXTRA in "" "--intra-op-threads 1" "--grpc-server grpcio"; do
  # shellcheck disable=SC2086  # EXTRA is a list of flags
  "$PY" -m slimserve serve --repository "$REPO" --http-port 18501 --grpc-port 18502 \
    --log-level warning $EXTRA &
  SERVER=$!; wait_ready http://127.0.0.1:18501/v2/health/ready
  echo "## slimserve ${EXTRA:-(defaults)}"
  PROTOCOLS=http-json,http-binary,grpc
  [ "$EXTRA" = "--grpc-server grpcio" ] && PROTOCOLS=grpc
  "${BENCH[@]}" --url http://127.0.0.1:18501 --grpc-url 127.0.0.1:18502 \
    --model mlp-onnx --concurrency 1,64 --protocol $PROTOCOLS --input-file "$REQ"
  if [ -z "$EXTRA" ]; then
    echo "## the same gRPC load from grpc.aio's client (--grpc-client grpcio)"
    "${BENCH[@]}" --url http://127.0.0.1:18501 --grpc-url 127.0.0.1:18502 --model mlp-onnx \
      --concurrency 64 --protocol grpc --grpc-client grpcio --input-file "$REQ" | tail -1
  fi
  if command -v h2load >/dev/null; then
    echo "## h2load (nghttp2's C client), gRPC, 4 connections x 16 streams = 64 in flight"
    "${H2LOAD[@]}" http://127.0.0.1:18502/inference.GRPCInferenceService/ModelInfer \
      | grep -E "finished in|requests:|time for request"
  fi
  stop "$SERVER"
done
"$PY" benchmarks/inprocess.py --repository "$REPO" --models mlp-onnx --intra-op-threads 1 \
  --seconds 0.5 | tail -1

if [ "$MINILM" != "--no-minilm" ]; then
  MREPO=$(mktemp -d); cp -r "$MODELS/minilm" "$MREPO/"
  trap 'rm -rf "$REPO" "$MREPO"' EXIT
  echo "## MiniLM in-process (OpenMP spinning, then sleeping)"
  "$PY" benchmarks/inprocess.py --repository "$MREPO" --models minilm --intra-op-threads 1,2 \
    --seconds 1 | tail -2
  OMP_WAIT_POLICY=PASSIVE "$PY" benchmarks/inprocess.py --repository "$MREPO" --models minilm \
    --intra-op-threads 1,2 --seconds 1 | tail -2
  for EXTRA in "" "--spin-wait"; do
    # shellcheck disable=SC2086
    "$PY" -m slimserve serve --repository "$MREPO" --http-port 18501 --grpc-port 18502 \
      --log-level warning $EXTRA &
    SERVER=$!; wait_ready http://127.0.0.1:18501/v2/models/minilm/ready
    echo "## slimserve MiniLM ${EXTRA:-(defaults)}"
    "${BENCH[@]}" --url http://127.0.0.1:18501 --grpc-url 127.0.0.1:18502 --model minilm \
      --concurrency 16 --protocol http-json,http-binary,grpc
    stop "$SERVER"
  done
fi
echo "# $(uptime)"
