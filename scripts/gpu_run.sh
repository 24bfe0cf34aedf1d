#!/usr/bin/env bash
# The one command for the GPU machine: install the carried wheels, unpack Triton, run the check.
#
# Run from the repository root, no network needed:  bash scripts/gpu_run.sh [OUT_DIR]
# OUT_DIR defaults to $OUT (the device tool's result folder), else out/gpu_check.
# BUDGET_S (default 240) is the check's own time budget; the whole command takes about
# BUDGET_S + 30 s. Wheels come from .whl/*.whl (diffusers, tritonclient, python-rapidjson);
# .whl/fallback/*.whl (grpcio, protobuf) only if tritonclient.grpc does not import without
# them; .whl/triton-min.tar.xz (scripts/pack_triton.sh) if present. GPU_CHECK_ARGS adds options
# to gpu_check.py (--sections, --backend, --devices, --sizes sd15,sdxl; a CPU rehearsal:
# GPU_CHECK_ARGS=--dry-run PY=.venv/bin/python SITE=/tmp/x).
#
# The check runs in a small virtual environment ($SITE/venv) whose site-packages lists every
# folder on PY's sys.path, $SITE and this checkout: tritonserver's python backend stubs ignore
# PYTHONPATH and take their prefix from the first `python3` on PATH (which the product's
# launcher, triton_models.serve, sets to the check's interpreter), so they import the same code.
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

# A venv on PY's own interpreter that sees PY's packages, $SITE and the checkout (see above).
make_venv() {
    local venv=$1 base version packages
    base=$("$PY" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))') || return 1
    version=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")') || return 1
    packages="$venv/lib/python$version/site-packages"
    mkdir -p "$venv/bin" "$packages" || return 1
    ln -sf "$base" "$venv/bin/python3"
    printf 'home = %s\ninclude-system-site-packages = false\nversion = %s\n' \
        "$(dirname "$base")" "$version" > "$venv/pyvenv.cfg"
    { echo "$SITE"; echo "$PWD"
      "$PY" -c 'import os, sys; print("\n".join(p for p in sys.path if p and os.path.isdir(p)))'
    } > "$packages/gpu_check.pth"
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
        || step "unpacking Triton failed; the environment section will say so"
fi
# The product finds the server as the `pytriton` package: archives packed before
# pack_triton.sh added pytriton/__init__.py unpack as a namespace package without a __file__.
[[ -d "$SITE/pytriton" && ! -f "$SITE/pytriton/__init__.py" ]] && : > "$SITE/pytriton/__init__.py"
# A libpython carried for a Python that is not a shared build: the backend stub links to it.
[[ -d "$SITE/driffusion_extra_libs" ]] \
    && export LD_LIBRARY_PATH="$SITE/driffusion_extra_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
CHECK_PY=$PY
if make_venv "$SITE/venv"; then
    CHECK_PY="$SITE/venv/bin/python3"
else
    step "could not write $SITE/venv; running on $PY (the Triton stubs may not find the packages)"
fi
step "nvidia-smi"
timeout 20 nvidia-smi || step "nvidia-smi failed or is absent"
step "running scripts/gpu_check.py on $CHECK_PY (budget ${BUDGET_S} s)"
# shellcheck disable=SC2086 # GPU_CHECK_ARGS is a list of options
PYTHONUNBUFFERED=1 timeout -k 15 $((BUDGET_S + 90)) \
    "$CHECK_PY" scripts/gpu_check.py --out "$OUT_DIR" --budget-s "$BUDGET_S" ${GPU_CHECK_ARGS:-}
rc=$?
step "gpu_check.py exited with $rc; results in $OUT_DIR/gpu_check.json and gpu_check.md"
exit $rc
