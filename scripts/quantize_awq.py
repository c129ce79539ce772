#!/usr/bin/env python3
"""The seed's command-line entry: AWQ-quantize a model (same as `metal-marlin quantize`).

    python scripts/quantize_awq.py --model-path model.gguf --output-path out/ \
        [--activations-path activations.npz] --group-size 64 --salient-ratio 0.01 \
        --activation-method rms
"""

from __future__ import annotations

import sys

from metal_marlin.cli import main

if __name__ == "__main__":
    sys.exit(main(["quantize", *sys.argv[1:]]))
