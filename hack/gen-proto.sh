#!/usr/bin/env bash
# Regenerate the Python code for controller/proto/**/*.proto into controller/api/.
# Usage: hack/gen-proto.sh [OUTDIR]   (tests/unit/test_proto_fresh.py calls it with a temp dir
# and compares, so stale generated code fails `make test`).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-controller/api}"
mkdir -p "$out"
# Typed stubs (.pyi) for messages and services come from mypy-protobuf, so callers stay
# mypy --strict clean.
PATH="$PWD/.venv/bin:$PATH" .venv/bin/python -m grpc_tools.protoc -I controller/proto \
    --python_out="$out" --grpc_python_out="$out" \
    --mypy_out="$out" --mypy_grpc_out="$out" \
    $(find controller/proto -name '*.proto' | sort)
# grpc_tools emits absolute imports (`from ambit.v1 import ...`); make them package-relative.
find "$out" \( -name '*_pb2_grpc.py' -o -name '*.pyi' \) -exec sed -i 's/^from ambit\.v1 import/from . import/' {} +
for d in "$out" "$out/ambit" "$out/ambit/v1"; do
    [[ -f "$d/__init__.py" ]] || echo '"""Generated from controller/proto by hack/gen-proto.sh; do not edit."""' >"$d/__init__.py"
done
