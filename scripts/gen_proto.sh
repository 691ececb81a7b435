#!/usr/bin/env bash
# Regenerate the Python modules in src/slimserve/transport/vendor/ from the *.proto files there.
#
# Usage: scripts/gen_proto.sh [PYTHON]   (default: .venv/bin/python; needs grpcio-tools)
#
# Fix-ups after protoc (and a note atop the service module on its length):
# - imports between the generated modules become package-relative (`from . import ...`);
# - the messages are registered in slimserve's own descriptor pool (`vendor.POOL`) rather
#   than protobuf's default one. Our files declare package `inference` like Triton's, so a
#   process that also imports tritonclient.grpc (tests, the demo, user code) would otherwise
#   fail with "duplicate file name" / "duplicate symbol" errors.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${1:-.venv/bin/python}"
SRC=src/slimserve/transport/vendor
OUT=$SRC
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

"$PYTHON" -m grpc_tools.protoc -I "$SRC" \
    --python_out="$TMP" --pyi_out="$TMP" --grpc_python_out="$TMP" \
    "$SRC/model_config.proto" "$SRC/grpc_service.proto"

for f in "$TMP"/*.py "$TMP"/*.pyi; do
    sed -i \
        -e 's/^import \([a-z_]*_pb2\) as /from . import \1 as /' \
        -e 's/_descriptor_pool\.Default()\.AddSerializedFile(/_POOL.AddSerializedFile(/' \
        "$f"
    if grep -q '_POOL.AddSerializedFile(' "$f"; then
        sed -i 's/^# @@protoc_insertion_point(imports)$/&\nfrom . import POOL as _POOL/' "$f"
    fi
done

# model_config.proto declares no service: its _grpc module would be empty.
rm -f "$TMP/model_config_pb2_grpc.py"
# The service module runs past the 500 lines a source file may have; say why at its top.
sed -i '1a # Over 500 lines: protoc writes each RPC'"'"'s stub, servicer method and handler in full.\n# Change grpc_service.proto and rerun scripts/gen_proto.sh instead of this file.' \
    "$TMP/grpc_service_pb2_grpc.py"
mkdir -p "$OUT"
cp "$TMP"/*_pb2.py "$TMP"/*_pb2.pyi "$TMP"/*_pb2_grpc.py "$OUT"/
echo "generated: $(cd "$OUT" && ls ./*_pb2*.py*)"
