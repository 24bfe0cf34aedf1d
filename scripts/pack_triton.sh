#!/usr/bin/env bash
# Pack the smallest Triton that runs a python-backend model into .whl/triton-min.tar.xz.
#
# Source: the nvidia-pytriton wheel installed in .venv (Triton 2.51). Kept: the tritonserver
# binary, its bundled libraries, the python backend and the backend stub for ONE Python
# version, plus that version's libpython (the stub links against it and many Pythons are not
# shared builds). Everything is stripped of symbols; the layout is the wheel's own (with an
# empty pytriton/__init__.py), so unpacking the archive into a folder on PYTHONPATH (/tmp/site
# on the GPU machine, scripts/gpu_run.sh) lets triton_models.serve find it as `pytriton`.
#
# Usage: scripts/pack_triton.sh [PY_VERSION] [OUTPUT]   (defaults: 3.12 .whl/triton-min.tar.xz)
# LIBPYTHON=/path/to/libpython3.12.so.1.0 overrides where the shared libpython is taken from.
set -euo pipefail

PY_VERSION=${1:-3.12}
OUTPUT=${2:-.whl/triton-min.tar.xz}
VENV_PY=${VENV_PY:-.venv/bin/python}

site=$("$VENV_PY" -c 'import importlib.util, pathlib; spec = importlib.util.find_spec("pytriton"); print(pathlib.Path(spec.origin).parents[1])') || {
    echo "pack_triton: nvidia-pytriton is not installed in $VENV_PY (run make setup)" >&2; exit 1; }
home="$site/pytriton/tritonserver"
stub="$home/python_backend_stubs/$PY_VERSION/triton_python_backend_stub"
[[ -x "$home/bin/tritonserver" ]] || { echo "pack_triton: no tritonserver under $home" >&2; exit 1; }
[[ -f "$stub" ]] || { echo "pack_triton: no backend stub for Python $PY_VERSION under $home" >&2; exit 1; }

find_libpython() {
    local name="libpython$PY_VERSION.so.1.0" candidate libdir
    if [[ -n "${LIBPYTHON:-}" ]]; then echo "$LIBPYTHON"; return; fi
    for candidate in "python$PY_VERSION" "$(pyenv root 2>/dev/null)"/versions/"$PY_VERSION"*/bin/"python$PY_VERSION"; do
        libdir=$("$candidate" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))' 2>/dev/null) || continue
        [[ -f "$libdir/$name" ]] && { echo "$libdir/$name"; return; }
    done
    echo "pack_triton: no shared $name found; set LIBPYTHON=/path/to/$name" >&2
    return 1
}
libpython=$(find_libpython)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
dest="$stage/pytriton/tritonserver"
mkdir -p "$dest/bin" "$dest/backends/python" "$dest/python_backend_stubs/$PY_VERSION" \
         "$stage/nvidia_pytriton.libs" "$stage/driffusion_extra_libs"
cp "$home/bin/tritonserver" "$dest/bin/"
: > "$stage/pytriton/__init__.py"  # triton_models.serve locates the server by `import pytriton`
cp "$home/backends/python/libtriton_python.so" "$home/backends/python/triton_python_backend_utils.py" \
   "$dest/backends/python/"
cp "$stub" "$dest/python_backend_stubs/$PY_VERSION/"
# The wheel's bundled libraries, less the libpython of the wheel's own build Python.
find "$site/nvidia_pytriton.libs" -maxdepth 1 -type f ! -name 'libpython*' \
     -exec cp {} "$stage/nvidia_pytriton.libs/" \;
cp "$libpython" "$stage/driffusion_extra_libs/"

find "$stage" -type f \( -name '*.so*' -o -name tritonserver -o -name triton_python_backend_stub \) \
     -exec strip --strip-unneeded {} \;
# The stripped binary must still load its libraries (--help exits 1, so look at what it prints).
usage=$("$dest/bin/tritonserver" --help 2>&1 || true)
grep -q -- --model-repository <<<"$usage" || {
    echo "pack_triton: the stripped tritonserver does not start" >&2; exit 1; }

mkdir -p "$(dirname "$OUTPUT")"
echo "pack_triton: compressing $(du -sh "$stage" | cut -f1) with xz -9 (about 2 minutes)" >&2
tar -C "$stage" -cf - pytriton nvidia_pytriton.libs driffusion_extra_libs | xz -T0 -9 > "$OUTPUT.partial"
mv "$OUTPUT.partial" "$OUTPUT"
echo "pack_triton: wrote $OUTPUT ($(du -h "$OUTPUT" | cut -f1), Python $PY_VERSION, libpython from $libpython)" >&2
