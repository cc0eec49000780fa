#!/usr/bin/env bash
# Regenerate the Python code for mesh/proto/**/*.proto into mesh/api/.
# Usage: hack/gen-proto.sh [OUTDIR]   (tests/unit/test_proto_fresh.py calls it with a temp dir
# and compares, so stale generated code fails `make test`).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-mesh/api}"
mkdir -p "$out"
# Typed stubs (.pyi) for messages and services come from mypy-protobuf, so callers stay
# mypy --strict clean.
PATH="$PWD/.venv/bin:$PATH" .venv/bin/python -m grpc_tools.protoc -I mesh/proto \
    --python_out="$out" --grpc_python_out="$out" \
    --mypy_out="$out" --mypy_grpc_out="$out" \
    $(find mesh/proto -name '*.proto' | sort)
# grpc_tools emits absolute imports (`from ambit.v1 import ...`); make them package-relative.
find "$out" \( -name '*_pb2_grpc.py' -o -name '*.pyi' \) -exec sed -i 's/^from ambit\.v1 import/from . import/' {} +
for d in "$out" "$out/ambit" "$out/ambit/v1"; do
    [[ -f "$d/__init__.py" ]] || echo '"""Generated from mesh/proto by hack/gen-proto.sh; do not edit."""' >"$d/__init__.py"
done
