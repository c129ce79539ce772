"""``metal-marlin``: one command line for every job.

User mistakes (bad flags, missing files, shapes that do not fit, ``--device gpu`` without
a GPU) print one line ``metal-marlin: error: ...`` and exit with status 2; no traceback.

Every subcommand takes ``--device {auto,gpu,cpu}`` (default ``MM_DEVICE``, else auto: the
GPU when MLX has one). It is applied before the command runs (see :mod:`metal_marlin.device`)
and exported as ``MM_DEVICE`` so that processes started from here (the service's worker,
its job processes) compute on the same device.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from metal_marlin.assets import BUILTIN_MODEL_NAME, BUILTIN_MODELS
from metal_marlin.calibration import DEFAULT_N_SAMPLES, DEFAULT_SEQ_LEN
from metal_marlin.device import DEVICE_CHOICES, DEVICE_ENV, MLXUnavailableError, parse_device, select_device

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError)
#: ``--model`` of every command: a path or a built-in model's name.
MODEL_HELP = (
    "GGUF file, Hugging Face / MLX folder, or a built-in model's name: "
    + ", ".join(BUILTIN_MODELS) + f" (default: {BUILTIN_MODEL_NAME})"
)
#: The entry point group through which the service and the worker add their commands.
COMMANDS_GROUP = "metal_marlin.commands"


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    """The seed's flags (scripts/quantize_awq.py) plus bits and calibration size."""
    parser.add_argument("--model-path", "--model", dest="model_path", default=None, help=MODEL_HELP)
    parser.add_argument("--output-path", required=True, help="folder to write the quantized model to")
    parser.add_argument("--activations-path", default=None, help="activations.npz from `metal-marlin collect` (default: built-in Wikipedia calibration text)")
    parser.add_argument("--text", dest="text_path", default=None, help="calibrate on this UTF-8 text file instead of Wikipedia")
    parser.add_argument("--group-size", type=int, default=128, help="quantization group size: 32, 64, 128, 256 (SmolLM2 needs 32 or 64; Gemma 3 270M takes any)")
    parser.add_argument("--salient-ratio", type=float, default=0.01, help="fraction of input channels kept in fp16 (0 = pure int4, loadable by mlx-lm)")
    parser.add_argument("--activation-method", choices=("mean", "max", "rms"), default="rms")
    parser.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    parser.add_argument("--n-samples", type=int, default=DEFAULT_N_SAMPLES)
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    parser.add_argument("--n-grid", type=int, default=20, help="alpha grid points of the scale search")
    parser.add_argument("--duo-scaling", action="store_true", help="AutoAWQ's weight-normalised scales")
    parser.add_argument(
        "--method", choices=("awq", "awq+round", "rtn"), default="awq",
        help="awq: scale + clip search; awq+round: then learned rounding per block (slower, closer); rtn: round-to-nearest",
    )
    parser.add_argument("--rounding-steps", type=int, default=200, help="signed-gradient steps per block for --method awq+round")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_quantize(args: argparse.Namespace) -> int:
    from metal_marlin.pipeline import awq_quantize_model

    stats = awq_quantize_model(
        args.model_path,
        args.output_path,
        activations_path=args.activations_path,
        group_size=args.group_size,
        salient_ratio=args.salient_ratio,
        activation_method=args.activation_method,
        verbose=not args.quiet,
        bits=args.bits,
        n_samples=args.n_samples,
        seq_len=args.seq_len,
        text_path=args.text_path,
        n_grid=args.n_grid,
        duo_scaling=args.duo_scaling,
        method=args.method,
        rounding_steps=args.rounding_steps,
    )
    learned = f"{stats['blocks_round']} learned rounding / " if args.method == "awq+round" else ""
    print(
        f"wrote {args.output_path}: {stats['bits']}-bit g{stats['group_size']}, "
        f"{stats['bits_per_weight']:.3f} bits/weight, {learned}{stats['blocks_awq']} blocks AWQ / "
        f"{stats['blocks_rtn']} round-to-nearest, {stats['total_time_s']:.1f} s"
    )
    return 0


def run_collect(args: argparse.Namespace) -> int:
    import mlx.core as mx
    import numpy as np

    from metal_marlin.calibration import CalibrationBatch, calibration_tokens, save_activations
    from metal_marlin.checkpoints.loader import load_builtin_model, load_model
    from metal_marlin.tokenizer import load_tokenizer

    ids = calibration_tokens(load_tokenizer(args.model_path), args.n_samples, args.seq_len, args.text_path)
    hidden = None
    if args.hidden_states:
        model = (load_builtin_model() if args.model_path is None else load_model(args.model_path)).model
        hidden = np.array(model.model.embed(mx.array(ids)).astype(mx.float32))
    save_activations(args.output, CalibrationBatch(ids, hidden))
    print(f"wrote {args.output}: {ids.shape[0]} samples x {ids.shape[1]} tokens" + (" + hidden states" if hidden is not None else ""))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from metal_marlin.eval import evaluate_model

    result = evaluate_model(args.model, args.window, args.max_windows, args.text_path, args.batch_size, corpus=args.corpus)
    print(json.dumps(result.as_dict(), indent=1))
    return 0


def run_generate_command(args: argparse.Namespace) -> int:
    from metal_marlin.generate.cli import run_generate

    return run_generate(
        model=args.model,
        prompt=args.prompt,
        chat=args.chat,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )


def run_export(args: argparse.Namespace) -> int:
    from metal_marlin.checkpoints.autoawq import export_autoawq, import_autoawq

    convert = export_autoawq if args.format == "autoawq" else import_autoawq
    path = convert(args.model, args.output)
    layout = "AutoAWQ GEMM" if args.format == "autoawq" else "native MLX-layout"
    print(f"wrote {path}: {layout} folder")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from metal_marlin.device import device_info

    info = device_info()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key == "memory_bytes" and isinstance(value, int):
            value = f"{value} ({value / 2**30:.1f} GiB)"
        print(f"{key + ':':<{width + 1}} {'-' if value is None else value}")
    return 0


DEVICE_HELP = (
    f"compute on the GPU (Metal on macOS, CUDA on Linux) or the CPU (default: ${DEVICE_ENV}, else auto: "
    "the GPU when MLX has one)"
)


def _device_parent() -> argparse.ArgumentParser:
    """``--device``, shared by every subcommand (a parent parser: it goes after the command)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--device", type=str.lower, choices=DEVICE_CHOICES, default=None, help=DEVICE_HELP)
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metal-marlin", description="AWQ quantization and int4 serving on MLX")
    # Also before the command (`metal-marlin --device cpu eval`); a separate dest, because a
    # subparser's default would overwrite the top-level value. The subcommand's flag wins.
    parser.add_argument("--device", dest="global_device", type=str.lower, choices=DEVICE_CHOICES, default=None, help=DEVICE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    common = [_device_parent()]

    quantize = sub.add_parser("quantize", parents=common, help="AWQ-quantize a model into an MLX-layout folder")
    add_quantize_arguments(quantize)
    quantize.set_defaults(func=run_quantize)

    collect = sub.add_parser("collect", parents=common, help="write calibration inputs to activations.npz")
    collect.add_argument("--model-path", "--model", dest="model_path", default=None, help=MODEL_HELP)
    collect.add_argument("--output", required=True, help="path of the .npz to write")
    collect.add_argument("--text", dest="text_path", default=None)
    collect.add_argument("--n-samples", type=int, default=DEFAULT_N_SAMPLES)
    collect.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    collect.add_argument("--hidden-states", action="store_true", help="also store the first block's input")
    collect.set_defaults(func=run_collect)

    evaluate = sub.add_parser("eval", parents=common, help="perplexity on held-out Wikipedia (or --corpus kjv, or --text)")
    evaluate.add_argument("--model", default=None, help=MODEL_HELP)
    evaluate.add_argument("--text", dest="text_path", default=None, help="a UTF-8 text file instead of a built-in corpus")
    evaluate.add_argument("--corpus", choices=("wikipedia", "kjv"), default="wikipedia",
                          help="built-in text: held-out Wikipedia, or the out-of-domain King James Bible")
    evaluate.add_argument("--window", type=int, default=512)
    evaluate.add_argument("--max-windows", type=int, default=None)
    evaluate.add_argument("--batch-size", type=int, default=4)
    evaluate.set_defaults(func=run_eval)

    generate = sub.add_parser("generate", parents=common, help="generate text, streaming to the terminal")
    generate.add_argument("--model", default=None, help=MODEL_HELP)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--max-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.set_defaults(func=run_generate_command)

    export = sub.add_parser("export", parents=common, help="convert a 4-bit folder: native MLX layout <-> AutoAWQ GEMM")
    export.add_argument("--model", required=True, help="folder to convert (native for autoawq, AutoAWQ for native)")
    export.add_argument("--output", required=True, help="new folder to write")
    export.add_argument("--format", required=True, choices=("autoawq", "native"), help="layout to write")
    export.set_defaults(func=run_export)

    info = sub.add_parser("info", parents=common, help="versions, the compute device (GPU or CPU) and its memory")
    info.add_argument("--json", action="store_true", help="print a JSON object")
    info.set_defaults(func=run_info)
    for command in _registered_commands():
        command.load()(sub, common)
    return parser


def _registered_commands() -> list[importlib.metadata.EntryPoint]:
    """Commands other packages add (``serve``, ``worker``, ``openapi`` from the service and
    the worker), found through the ``metal_marlin.commands`` entry point group: the library
    never imports the layers built on it. Each entry point is ``register(subparsers, parents)``
    and may set ``device_mode`` on its parser: ``"select"`` (the default: select the device
    here), ``"export"`` (only pass ``--device`` on to the processes it starts; an explicit
    GPU request is checked in a throwaway interpreter) or ``"none"`` (no device at all)."""
    return sorted(importlib.metadata.entry_points(group=COMMANDS_GROUP), key=lambda e: e.name)


def _probe_device_in_subprocess(device: str) -> None:
    """Fail ``serve --device gpu`` now, not in a worker restart loop, without loading MLX here.

    The service process never imports MLX (on a GPU host that would also initialise the GPU
    in the wrong process), so the check runs in a throwaway interpreter.
    """
    code = "import sys\nfrom metal_marlin.device import select_device\ntry:\n    select_device()\n" \
        "except (ValueError, ImportError) as e:\n    sys.exit(str(e))\n"
    env = dict(os.environ, **{DEVICE_ENV: device})
    result = subprocess.run([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise ValueError(lines[-1] if lines else f"could not check the {device} device (exit status {result.returncode})")


def _apply_device(args: argparse.Namespace) -> None:
    """``--device`` (else ``MM_DEVICE``, else auto): select it here, export it to children."""
    mode = getattr(args, "device_mode", "select")
    if mode == "none":
        return
    requested = args.device if args.device is not None else getattr(args, "global_device", None)
    device = parse_device(requested)  # ValueError for a bad MM_DEVICE
    if requested is not None:
        os.environ[DEVICE_ENV] = device  # inherited by the worker and its job processes
    if mode == "export":  # a process started from here selects; only an explicit GPU request can fail
        if device == "gpu":
            _probe_device_in_subprocess(device)
        return
    select_device(device)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _apply_device(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("metal-marlin: interrupted", file=sys.stderr)
        return 130
    except (*USER_ERRORS, MLXUnavailableError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"metal-marlin: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
