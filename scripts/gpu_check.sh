#!/usr/bin/env bash
# The GPU check of docs/gpu.md, in ONE run of the GPU machine: it has no network and no model
# weights, takes at most 64 MiB of files per run and keeps nothing between runs. So the run
# builds random-init models (timings and memory are valid on random weights, accuracy is not)
# from a kit of ~32 MiB: the wheels its image lacks, SmolLM2's tokenizer and config, and the
# CLUTRR and TruthfulQA splits.
#
#   bash scripts/gpu_check.sh pack    # here: assemble the kit in .gpu/ (git-ignored)
#   bash scripts/gpu_check.sh cpu     # here: the same stages on this CPU with small
#                                     #   stand-ins (the wiring; minutes), into gpu_check_out/cpu
#   bash scripts/gpu_check.sh run     # there, carrying .gpu: install the wheels, then
#     1. scripts/benchmark.py on a random Llama-2-7B shape in bf16 (the table, peak memory);
#     2. lofit-lens doctor on that model in bf16 (every tolerance and gap);
#     3. lofit-lens run on it: CLUTRR, --budget paper --k 0.03 (the paper's protocol: 5 + 5
#        epochs, all data; time per phase and peak memory in its metrics.json);
#     4. scripts/benchmark.py on a random SmolLM2-135M shape in fp32;
#     then summary.md. Each stage has its own time limit and writes into $OUT as it ends, so
#     a stage that fails or runs out of time leaves the others' results.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
mode="${1:-}"
kit="$repo/.gpu"
# What the GPU image lacks of what lofit-lens imports, at the lock's versions (transformers
# too: the image's 5.17 is older than the 5.23 TransformerLens 4.3 was made against).
WHEELS=(transformer-lens transformers datasets dill multiprocess plotly beartype fancy-einsum
        typeguard typing-extensions)

stage() {  # stage NAME SECONDS COMMAND...: run it under a time limit, log its end
    local name="$1" limit="$2" start rc
    shift 2
    start=$(date +%s)
    echo "== $name (limit ${limit} s) $(date -u +%H:%M:%S)"
    timeout -k 10 "$limit" "$@"
    rc=$?
    echo "== $name: exit $rc after $(( $(date +%s) - start )) s"
    return $rc
}

check() {  # check DEVICE BIG_SHAPE BIG_DTYPE SMALL_SHAPE BUDGET OUT
    local device="$1" big="$2" big_dtype="$3" small="$4" budget="$5" out="$6"
    local models="${LOFIT_GPU_MODELS:-/dev/shm/lofit-gpu-models}" status=0
    [[ -d /dev/shm && -w /dev/shm ]] || models="${TMPDIR:-/tmp}/lofit-gpu-models"
    rm -rf "$models" && mkdir -p "$models" "$out"
    local common=(--device "$device" --tokenizer "$kit/tok" --data-dir "$kit/data" --models-dir "$models")
    stage "benchmark $big $big_dtype" "${LOFIT_GPU_BENCH_LIMIT:-180}" \
        python3 scripts/benchmark.py --shape "$big" --dtype "$big_dtype" "${common[@]}" --repeats 5 \
        --out "$out/bench-$big-$big_dtype.json" || status=1
    if [[ -f "$models/$big/config.json" ]]; then
        stage "doctor $big $big_dtype" 60 \
            python3 -m lofit_lens.cli doctor --model "$models/$big" --dtype "$big_dtype" \
            --device "$device" >"$out/doctor-$big-$big_dtype.txt" 2>&1 || status=1
        cat "$out/doctor-$big-$big_dtype.txt"
        stage "lofit-lens run $big $big_dtype --budget $budget" "${LOFIT_GPU_RUN_LIMIT:-200}" \
            python3 -m lofit_lens.cli run --task clutrr --model "$models/$big" --dtype "$big_dtype" \
            --device "$device" --budget "$budget" --k 0.03 --data-dir "$kit/data" \
            --out "$models/run" --quiet >"$out/run-$big-$big_dtype.log" 2>&1 || status=1
        tail -n 30 "$out/run-$big-$big_dtype.log"
        cp "$models/run/metrics.json" "$out/run-$big-$big_dtype-metrics.json" 2>/dev/null || status=1
    fi
    rm -rf "$models/$big"
    stage "benchmark $small float32" "${LOFIT_GPU_SMALL_LIMIT:-100}" \
        python3 scripts/benchmark.py --shape "$small" --dtype float32 "${common[@]}" --repeats 5 \
        --out "$out/bench-$small-float32.json" || status=1
    rm -rf "$models"
    python3 scripts/gpu_summary.py "$out" >"$out/summary.md" && cat "$out/summary.md"
    return $status
}

case "$mode" in
pack)
    grep -qxF "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >>.git/info/exclude
    grep -qxF "/gpu_check_out/" .git/info/exclude 2>/dev/null || echo "/gpu_check_out/" >>.git/info/exclude
    rm -rf "$kit" && mkdir -p "$kit/wheels" "$kit/tok" "$kit/data"
    pins=()
    for w in "${WHEELS[@]}"; do
        pin="$(grep -iE "^${w}==" requirements/lock.txt | head -1 | sed -E 's/ .*//')"
        [[ -n "$pin" ]] || { echo "gpu_check: $w is not in requirements/lock.txt" >&2; exit 1; }
        pins+=("$pin")
    done
    python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$kit/wheels" "${pins[@]}"
    tok="$(python3 -c 'from lofit_lens.backends.hf import embedded_hf_folder; print(embedded_hf_folder("smollm2-135m"))')"
    for f in config.json generation_config.json tokenizer.json tokenizer_config.json \
             special_tokens_map.json chat_template.jinja; do
        [[ -f "$tok/$f" ]] && cp "$tok/$f" "$kit/tok/"
    done
    data="${LOFIT_DATA_DIR:-$(python3 -c 'from lofit_lens.tasks.base import default_data_dir; print(default_data_dir())')}"
    cp -r "$data/clutrr" "$data/truthfulqa" "$kit/data/"
    echo "gpu_check: kit in $kit ($(du -sh "$kit" | cut -f1)); on the GPU machine, one run:"
    echo "  carry [\".gpu\"], command: bash scripts/gpu_check.sh run"
    ;;
cpu)  # the wiring on this CPU: stand-in shapes, the smoke budget
    [[ -d "$kit/tok" ]] || { echo "gpu_check: run 'bash scripts/gpu_check.sh pack' first" >&2; exit 2; }
    check cpu overhead bfloat16 overhead smoke "$repo/gpu_check_out/cpu"
    ;;
run)
    out="${OUT:-$repo/gpu_check_out}"
    mkdir -p "$out"
    exec > >(tee -a "$out/gpu_check.log") 2>&1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/lofit-site "$kit"/wheels/*.whl || { echo "gpu_check: wheel install failed"; exit 3; }
    export PYTHONPATH="/tmp/lofit-site:$repo${PYTHONPATH:+:$PYTHONPATH}"
    export LOFIT_LENS_CACHE=/tmp/lofit-cache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
      python3 -c 'import torch; from lofit_lens.versions import library_versions as v; print("cuda", torch.version.cuda, v())'
    } 2>&1 | tee "$out/env.txt"
    check cuda llama2-7b bfloat16 smollm2-135m paper "$out"
    ;;
*)
    sed -n '2,21p' "$0"; exit 2 ;;
esac
