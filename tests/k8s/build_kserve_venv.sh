#!/usr/bin/env bash
# Build (once) the venv holding the KServe SDK that tests/k8s round-trips the
# InferenceServices through: build/kserve-venv by default, rebuilt when its pins change.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:-$here/../../build/kserve-venv}"
pins="$here/kserve-constraints.txt"
stamp="$dest/.installed-$(sha256sum "$pins" | cut -c1-16)"
[ -f "$stamp" ] && exit 0
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || { echo "build_kserve_venv: need $python on PATH" >&2; exit 1; }
rm -rf "$dest"
"$python" -m venv "$dest"
"$dest/bin/python" -m pip install --quiet -c "$pins" kserve pandas
touch "$stamp"
