#!/usr/bin/env bash
# Build .venv-tl3: the invoking python3's packages (torch 2.13.0+cpu, transformers, ...) plus
# transformer-lens 3.9 (which still has HookedTransformer) shadowing its 4.x, with
# the versions of requirements/lock-tl3.txt, and lofit_lens installed editable from this
# checkout. Idempotent; quiet; fails loudly.
#
#   bash scripts/setup_tl3_env.sh && .venv-tl3/bin/python -m pytest tests/test_tl3.py -q
set -euo pipefail

TL3_VERSION="3.9.0"
TORCH_VERSION="2.13.0"   # the invoking environment's CPU build: pinned so pip never pulls a CUDA torch

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv-tl3"
py="$venv/bin/python"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT

run() {  # run quietly; on failure show the log and stop
    if ! "$@" >"$log" 2>&1; then
        echo "setup_tl3_env: FAILED: $*" >&2
        cat "$log" >&2
        exit 1
    fi
}

if [[ ! -x "$py" ]]; then
    # The invoking python3's packages (a venv's too, which --system-site-packages would
    # skip) come after the venv's own, through a .pth file.
    run python3 -m venv "$venv"
    site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    python3 -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"]); print(p["platlib"])' \
        | sort -u > "$site/_lofit_parent_env.pth"
fi

# The venv's torch must be the invoking environment's, already installed: check before pip
# can touch it.
have_torch="$("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
if [[ "$have_torch" != "$TORCH_VERSION"* ]]; then
    echo "setup_tl3_env: expected torch $TORCH_VERSION from the invoking environment, got '${have_torch:-none}'" >&2
    exit 1
fi

have_tl="$("$py" -c 'from importlib.metadata import version; print(version("transformer-lens"))' 2>/dev/null || true)"
if [[ "$have_tl" != "$TL3_VERSION" ]]; then
    run "$py" -m pip install --disable-pip-version-check --no-input \
        -c "$repo/requirements/lock-tl3.txt" "transformer-lens==$TL3_VERSION" "torch==$TORCH_VERSION"
    if grep -qiE "nvidia|cuda|Downloading torch-" "$log"; then
        echo "setup_tl3_env: pip tried to fetch a CUDA/new torch build:" >&2
        grep -iE "nvidia|cuda|Downloading torch-" "$log" >&2
        exit 1
    fi
fi

# lofit_lens from this checkout (no deps: they come from the invoking environment).
# (find_spec, not import: importing the package is the tests' job, not set-up's)
if ! "$py" -c 'import importlib.util as u, sys; s = u.find_spec("lofit_lens"); sys.exit(0 if s and s.origin.startswith(sys.argv[1]) else 1)' "$repo" 2>/dev/null; then
    run "$py" -m pip install --disable-pip-version-check --no-input --no-deps -e "$repo"
fi

"$py" -c "import sys, lofit_lens.versions as v; v.check_lock(sys.argv[1])" "$repo/requirements/lock-tl3.txt" >/dev/null

# Verify: TL 3.9 with the invoking environment's torch, and HookedTransformer present.
"$py" - "$TL3_VERSION" "$TORCH_VERSION" "$repo" <<'EOF'
import importlib.util
import sys
from importlib.metadata import version

import torch
from transformer_lens import HookedTransformer  # noqa: F401  (removed in 4.x)

tl_want, torch_want, repo = sys.argv[1], sys.argv[2], sys.argv[3]
tl = version("transformer-lens")  # TL 3.9 has no transformer_lens.__version__
if tl != tl_want:
    sys.exit(f"setup_tl3_env: transformer-lens {tl} != {tl_want}")
if not importlib.util.find_spec("lofit_lens").origin.startswith(repo):
    sys.exit("setup_tl3_env: lofit_lens does not import from this checkout")
if not torch.__version__.startswith(torch_want) or torch.version.cuda is not None:
    sys.exit(f"setup_tl3_env: torch {torch.__version__} is not the system's {torch_want} CPU build")
print(f".venv-tl3 ready: transformer-lens {tl}, torch {torch.__version__}")
EOF
