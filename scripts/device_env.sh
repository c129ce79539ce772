# Source me on the GPU machine after `scripts/device_setup.sh receive` installed /tmp/site:
# puts the carried wheels and the project first on Python's path and its commands on PATH.
export PYTHONPATH="${MM_DEVICE_SITE:-/tmp/site}${PYTHONPATH:+:$PYTHONPATH}"
export PATH="${MM_DEVICE_SITE:-/tmp/site}/bin:$PATH"
export PYTHONUNBUFFERED=1
# Kernels MLX compiles at run time are cached here, so a second process reuses them.
export MLX_PTX_CACHE_DIR="${MLX_PTX_CACHE_DIR:-/tmp/mlx-ptx}"
