#!/usr/bin/env bash
# The one command for the GPU machine: install the carried wheels, unpack Triton, run the check.
#
# Run from the repository root, no network needed:  bash scripts/gpu_run.sh [OUT_DIR]
# OUT_DIR defaults to $OUT (the device tool's result folder), else out/gpu_check.
# BUDGET_S (default 240) is the check's own time budget; the whole command takes about
# BUDGET_S + 30 s. Wheels come from .whl/*.whl (diffusers, tritonclient, python-rapidjson);
# .whl/fallback/*.whl (grpcio, protobuf) only if tritonclient.grpc does not import without
# them; .whl/triton-min.tar.xz (scripts/pack_triton.sh) if present. GPU_CHECK_ARGS adds options
# to gpu_check.py (a CPU rehearsal: GPU_CHECK_ARGS=--dry-run PY=.venv/bin/python SITE=/tmp/x).
set -uo pipefail

OUT_DIR=${1:-${OUT:-out/gpu_check}}
BUDGET_S=${BUDGET_S:-240}
SITE=${SITE:-/tmp/site}
PY=${PY:-python3}
mkdir -p "$OUT_DIR" "$SITE"
exec > >(tee -a "$OUT_DIR/gpu_run.log") 2>&1
started=$SECONDS
step() { echo "[gpu_run +$((SECONDS - started))s] $*"; }

install_wheels() {
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$@" && return 0
    step "pip could not install $*; unzipping the wheels instead"
    local wheel
    for wheel in "$@"; do "$PY" -m zipfile -e "$wheel" "$SITE" || return 1; done
}

shopt -s nullglob
wheels=(.whl/*.whl)
fallback=(.whl/fallback/*.whl)
if ((${#wheels[@]})); then
    step "installing ${#wheels[@]} carried wheels into $SITE"
    install_wheels "${wheels[@]}" || step "wheel install failed; the check records what is missing"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import tritonclient.grpc.aio" 2>/dev/null && ((${#fallback[@]})); then
    step "tritonclient.grpc does not import with this machine's grpcio/protobuf: installing ${fallback[*]}"
    install_wheels "${fallback[@]}"
fi
if [[ -f .whl/triton-min.tar.xz ]]; then
    step "unpacking .whl/triton-min.tar.xz into $SITE"
    tar -C "$SITE" -xJf .whl/triton-min.tar.xz || "$PY" -m tarfile -e .whl/triton-min.tar.xz "$SITE" \
        || step "unpacking Triton failed; its section will say so"
fi
step "nvidia-smi"
timeout 20 nvidia-smi || step "nvidia-smi failed or is absent"
step "running scripts/gpu_check.py (budget ${BUDGET_S} s)"
PYTHONUNBUFFERED=1 timeout -k 15 $((BUDGET_S + 90)) \
    "$PY" scripts/gpu_check.py --out "$OUT_DIR" --budget-s "$BUDGET_S" ${GPU_CHECK_ARGS:-}
rc=$?
step "gpu_check.py exited with $rc; results in $OUT_DIR/gpu_check.json"
exit $rc
