"""``python -m converters`` (also ``peft-twins-convert``): inspect, convert and merge checkpoint
files, and move LoRA adapters to and from PEFT, without writing any Python.

Every subcommand has ``--help``. Bad input ends with a one-line ``error: ...`` on stderr and
exit status 1 (2 for a wrong command line), never a traceback, and never a partial output file.

Example
-------
>>> main(["--version"]) == 0  # doctest: +ELLIPSIS
peft-twins-convert ...
True
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checkpoint import KeyReport, library_version, parse_metadata

__all__ = ["main"]

_DESCRIPTION = """\
Convert PyTorch <-> Flax NNX checkpoints exactly (safetensors; PyTorch names and layouts are the
interchange format, a Flax layout is available), merge LoRA adapters into base checkpoints, and
import/export PEFT LoRA adapters."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        print(f"peft-twins-convert {library_version()}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("error: interrupted; no output file was written", file=sys.stderr)
        return 130
    except (ValueError, TypeError, KeyError, OSError, ImportError) as exc:
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        print(
            f"error: {' | '.join(line.strip() for line in message.splitlines() if line.strip())}",
            file=sys.stderr,
        )
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m converters", description=_DESCRIPTION)
    parser.add_argument("--version", action="store_true", help="print the library version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="list a checkpoint's tensors, dtypes, shapes, metadata and size")
    p.add_argument("file", help=".safetensors (either layout) or pickled .ckpt/.pt/.pth/.bin")
    p.add_argument("--limit", type=int, default=0, help="show at most this many tensors (default: all)")
    p.set_defaults(run=_inspect)

    p = sub.add_parser(
        "convert",
        help="convert a checkpoint file between torch and Flax layouts, or a .ckpt/.pt/.bin to safetensors",
        description="Streams tensor by tensor; the output is written atomically. Layer kinds come from the "
        "file's 'layer_kinds' metadata (recorded by save_torch_layout and in every Flax-layout file) or --kinds.",
    )
    p.add_argument("source", help="input checkpoint")
    p.add_argument("target", help="output .safetensors file")
    p.add_argument(
        "--to",
        choices=("flax", "torch"),
        help="layout to write (default: the other layout; torch for a pickled source)",
    )
    p.add_argument(
        "--kinds", help="JSON object {module: kind}, or a path to one, for modules the file does not describe"
    )
    p.add_argument(
        "--rename",
        nargs=2,
        action="append",
        metavar=("PATTERN", "REPLACEMENT"),
        help="rename tensors (glob, or 're:' regex); repeatable, first match wins",
    )
    _progress_flags(p)
    p.set_defaults(run=_convert)

    p = sub.add_parser(
        "merge",
        help="fold a LoRA adapter file into a base checkpoint: a plain merged base checkpoint",
        description="W += scaling * up @ down for every adapted layer (conv too), scaling = alpha / rank from the "
        "adapter file's metadata. Houlsby adapters cannot be merged.",
    )
    p.add_argument("base", help="base checkpoint (either layout)")
    p.add_argument("adapter", help="adapter checkpoint written by AdaptedModel.saver")
    p.add_argument("output", help="merged .safetensors file (in the base file's layout)")
    p.add_argument("--rank", type=int, help="LoRA rank, for an adapter file without metadata")
    p.add_argument("--alpha", type=float, help="LoRA alpha, for an adapter file without metadata")
    _progress_flags(p)
    p.set_defaults(run=_merge)

    p = sub.add_parser(
        "peft-import",
        help="turn a PEFT LoRA adapter directory into one of our adapter checkpoints",
        description="Reads adapter_config.json and adapter_model.safetensors; refuses what our LoRA cannot "
        "compute exactly (DoRA, modules_to_save, biases, per-layer ranks, ...).",
    )
    p.add_argument("peft_dir", help="PEFT adapter directory (save_pretrained output)")
    p.add_argument("output", help="adapter .safetensors file to write")
    p.set_defaults(run=_peft_import)

    p = sub.add_parser(
        "peft-export",
        help="turn one of our LoRA adapter checkpoints into a PEFT adapter directory",
        description="Writes adapter_config.json and adapter_model.safetensors that "
        "peft.PeftModel.from_pretrained(base, DIR) loads. Houlsby adapters and unfrozen layers are refused.",
    )
    p.add_argument("adapter", help="adapter checkpoint written by AdaptedModel.saver")
    p.add_argument("output_dir", help="PEFT adapter directory to write")
    p.add_argument("--base-model", help="recorded as base_model_name_or_path")
    p.add_argument(
        "--conv-geometry-checked",
        action="store_true",
        help="confirm that adapted convs use dilation 1 and padding_mode 'zeros' (PEFT cannot express others)",
    )
    p.set_defaults(run=_peft_export)
    return parser


def _progress_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--progress", dest="progress", action="store_true", default=None, help="always show progress"
    )
    group.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress")


def _show_progress(args: argparse.Namespace, *paths: str) -> bool:
    from .file_convert import PROGRESS_THRESHOLD

    if args.progress is not None:
        return args.progress
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p)) >= PROGRESS_THRESHOLD


def _inspect(args: argparse.Namespace) -> None:
    from .files import TensorFile

    with TensorFile(args.file) as f:
        names = f.names if args.limit <= 0 else f.names[: args.limit]
        width = max((len(n) for n in names), default=4)
        print(f"file: {f.path}")
        print(f"layout: {f.layout}")
        metadata = parse_metadata(f.metadata)
        if metadata:
            print("metadata:")
            for key in sorted(metadata):
                print(
                    f"  {key}: {json.dumps(metadata[key]) if not isinstance(metadata[key], str) else metadata[key]}"
                )
        else:
            print("metadata: (none)")
        print(f"tensors: {len(f.names)}")
        for name in names:
            dtype, shape = f.spec(name)
            print(f"  {name:<{width}}  {dtype:<5} {str(list(shape)):<20} {_human(f.nbytes(name))}")
        if len(names) < len(f.names):
            print(f"  ... ({len(f.names) - len(names)} more)")
        print(f"total: {_human(f.total_bytes)} ({f.total_bytes} bytes) in {len(f.names)} tensors")


def _convert(args: argparse.Namespace) -> None:
    from .file_convert import convert_file
    from .files import PICKLE_SUFFIXES, TensorFile

    layout = args.to
    if layout is None:
        if args.source.endswith(PICKLE_SUFFIXES):
            layout = "torch"
        else:
            with TensorFile(args.source) as f:
                layout = "torch" if f.layout == "flax" else "flax"
    report = convert_file(
        args.source,
        args.target,
        layout=layout,
        layer_kinds=_kinds(args.kinds),
        rename=[tuple(rule) for rule in args.rename or ()],
        progress=_show_progress(args, args.source),
    )
    _print_report(report, f"wrote {args.target} ({layout} layout)")


def _merge(args: argparse.Namespace) -> None:
    from .merge import merge_adapter_file

    given: dict[str, Any] = {}
    if args.rank is not None:
        given["rank"] = args.rank
    if args.alpha is not None:
        given["alpha"] = args.alpha
    report = merge_adapter_file(
        args.base,
        args.adapter,
        args.output,
        adapter_kwargs=given or None,
        progress=_show_progress(args, args.base),
    )
    _print_report(report, f"wrote {args.output}")


def _peft_import(args: argparse.Namespace) -> None:
    from .peft import peft_to_adapter_file

    report = peft_to_adapter_file(args.peft_dir, args.output)
    _print_report(report, f"wrote {args.output}")


def _peft_export(args: argparse.Namespace) -> None:
    from .peft import export_peft_adapter

    config = export_peft_adapter(
        args.adapter,
        args.output_dir,
        base_model_name_or_path=args.base_model,
        conv_geometry_checked=args.conv_geometry_checked,
    )
    print(
        f"wrote {args.output_dir}: r={config['r']}, lora_alpha={config['lora_alpha']}, "
        f"target_modules={config['target_modules']}"
    )


def _kinds(value: str | None) -> dict[str, str] | None:
    if value is None:
        return None
    text = Path(value).read_text() if os.path.isfile(value) else value
    try:
        kinds = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--kinds must be a JSON object {{module: kind}} or a path to one: {exc}") from None
    if not isinstance(kinds, dict):
        raise ValueError("--kinds must be a JSON object {module: kind}")
    return kinds


def _print_report(report: KeyReport, headline: str) -> None:
    print(headline)
    print(report.describe())


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover
