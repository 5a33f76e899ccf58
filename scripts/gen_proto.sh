#!/usr/bin/env bash
# Regenerate the Python gRPC code beside the .proto files (grokserve.v1 is proto/grokserve/v1).
# tests/unit/test_proto_generated.py fails when the committed code differs from what this produces.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-proto}"
python -m grpc_tools.protoc -Iproto --python_out="$OUT" --grpc_python_out="$OUT" --pyi_out="$OUT" \
  proto/grokserve/v1/*.proto
