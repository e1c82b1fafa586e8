"""`fse model path`: assemble the embedded default model (once) and print its path.
`fse model info`: load a model and say what llama.cpp runs it on."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fse.cli.common import EXIT_ERROR, flag_message, int_or_word
from fse.core.errors import InputError


def add_parser(commands: Any) -> None:
    model = commands.add_parser("model", help="the embedded default model")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    path = model_commands.add_parser("path", help="assemble (once) and print its path")
    path.set_defaults(func=cmd_model_path)
    info = model_commands.add_parser(
        "info", help="load a model; print its layers and where they run (CPU, GPUs)"
    )
    info.add_argument("--model", type=Path, help="GGUF file (default: the embedded Gemma 3 270M)")
    info.add_argument(
        "--gpu-layers",
        type=int_or_word,
        default="auto",
        help="layers on a GPU: auto (all when there is one; default), all, 0 (none), N",
    )
    info.set_defaults(func=cmd_model_info)


def cmd_model_path(args: argparse.Namespace) -> int:
    from fse.core.gguf import ModelError, default_model_path

    try:
        print(default_model_path())
    except ModelError as exc:
        print(f"fse: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    from fse.core.gguf import ModelError, default_model_path
    from fse.core.model import Model, devices, gpu_offload
    from fse.core.placement import place_model

    try:
        path = args.model if args.model is not None else default_model_path()
        with Model(path, gpu_layers=args.gpu_layers) as model:
            placed = place_model(model, devices())
            print(f"model: {model.name} ({model.description}), {path}")
            print(f"layers: {placed.layers}, {placed.gpu_layers} on a GPU")
    except ModelError as exc:
        message = str(exc)
        raise InputError(flag_message(message) if args.model is not None else message) from None
    except InputError as exc:  # GPU layers asked for where there is no GPU
        raise InputError(flag_message(str(exc))) from None
    print(f"backend: {placed.backend}")
    print(
        "gpu offload:",
        "yes" if gpu_offload() else "no (no GPU backend in this llama.cpp, or no GPU)",
    )
    for dev in placed.devices:
        memory = f", {dev.memory_bytes / (1 << 30):.1f} GiB" if dev.memory_bytes else ""
        print(f"device: {dev.name} ({dev.kind}: {dev.description}{memory}): {dev.layers} layers")
    return 0
