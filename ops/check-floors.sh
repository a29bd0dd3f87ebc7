#!/usr/bin/env bash
# Install every direct dependency at its floor (the `>=` bound in pyproject.toml's
# [project].dependencies and the `test` extra) in a throwaway venv and run the unit tests there,
# so a floor that no longer has what the code uses fails here instead of on a user's machine.
#
#   bash ops/check-floors.sh              (PYTHON=python3.12 bash ops/check-floors.sh: another Python)
#
# Transitive dependencies resolve to their newest allowed versions. Not wired into .ci/run.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/callbridge-floors.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1

# pyproject.toml -> constraints: `name==floor [; marker]` per requirement (extras dropped: pip
# refuses them in constraints). A requirement without a `>=` floor is an error.
"$PYTHON" - "$ROOT/pyproject.toml" >"$TMP/floors.txt" <<'PY'
import re, sys, tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = project["dependencies"] + project.get("optional-dependencies", {}).get("test", [])
bad = []
for req in reqs:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*?)\s*(;.*)?$", req)
    floor = re.search(r">=\s*([^,\s]+)", m.group(3)) if m else None
    if not floor:
        bad.append(req)
        continue
    print(f"{m.group(1)}=={floor.group(1)}" + (f" {m.group(4)}" if m.group(4) else ""))
if bad:
    sys.exit(f"no >= floor in: {', '.join(bad)}")
PY
echo "== floors"; cat "$TMP/floors.txt"

"$PYTHON" -m venv "$TMP/venv"
VPY="$TMP/venv/bin/python"
"$VPY" -m pip install -q -c "$TMP/floors.txt" -e "$ROOT[test]"

# Every floor whose marker applies must be what got installed.
"$VPY" - "$TMP/floors.txt" <<'PY'
import sys
from importlib.metadata import version
from packaging.requirements import Requirement  # pytest depends on it

wrong = []
for line in open(sys.argv[1]).read().splitlines():
    req = Requirement(line)
    if req.marker is None or req.marker.evaluate():
        got = version(req.name)
        if not req.specifier.contains(got, prereleases=True):
            wrong.append(f"{req.name}: want {req.specifier}, got {got}")
sys.exit("floors not installed: " + "; ".join(wrong) if wrong else 0)
PY

cd "$ROOT"
# The unit tier: what runs in-process against the installed libraries, in a couple of minutes.
"$VPY" -m pytest -q -p no:cacheprovider -m "not e2e and not ops"
