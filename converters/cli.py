"""``python -m converters`` (also ``peft-twins-convert``): inspect, convert and merge checkpoints,
and move LoRA adapters to and from PEFT, without writing any Python.

Every subcommand reads single ``.safetensors`` files (either layout), sharded checkpoints (a
folder holding ``model.safetensors.index.json``, or the index itself; a folder holding one
``model.safetensors``, as ``save_pretrained`` writes a small model) and pickled
``.ckpt``/``.pt``/``.pth``/``.bin`` state dicts; ``convert`` also writes sharded checkpoints
(``--max-shard-size``). Every subcommand has ``--help``. Bad input ends with a one-line
``error: ...`` on stderr and exit status 1 (2 for a wrong command line), never a traceback, and
never a partial output file. Progress bars go to stderr; output piped into ``head`` ends quietly.

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

from twinformat.format import library_version, parse_metadata
from twinformat.kinds import KINDS
from twinformat.report import KeyReport

__all__ = ["main"]

_DESCRIPTION = """\
Convert PyTorch <-> Flax NNX checkpoints exactly (safetensors; PyTorch names and layouts are the
interchange format, a Flax layout is available), between single files, sharded folders and
pickles; merge LoRA adapters into base checkpoints; import/export PEFT LoRA adapters."""

_SOURCE_HELP = (
    "a .safetensors file (either layout), a checkpoint folder (model.safetensors.index.json and its shards, "
    "or one model.safetensors), a model.safetensors.index.json, "
    "or a pickled .ckpt/.pt/.pth/.bin"
)
_KINDS_HELP = (
    "layer kinds for modules the source does not describe: MODULE=KIND pairs (comma-separated; MODULE may "
    "be a glob such as '*.LayerNorm'), a JSON object {module: kind}, or a path to one (e.g. written by the "
    "'kinds' subcommand); repeatable, earlier wins. Kinds: " + ", ".join(KINDS)
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.version:
            print(f"peft-twins-convert {library_version()}")
            return 0
        if args.command is None:
            parser.print_help()
            return 2
        args.run(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (``... | head``): what it wanted was written; end quietly, and
        # keep Python's exit-time flush of stdout from failing again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
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

    p = sub.add_parser(
        "inspect",
        help="list a checkpoint's tensors, dtypes, shapes, metadata and size (files, folders, pickles)",
    )
    p.add_argument("file", help=_SOURCE_HELP)
    p.add_argument("--limit", type=int, default=0, help="show at most this many tensors (default: all)")
    p.set_defaults(run=_inspect)

    p = sub.add_parser(
        "convert",
        help="convert a checkpoint between torch and Flax layouts, pickles and safetensors, one file and shards",
        description="Streams tensor by tensor; every output file is written atomically (a sharded index last). "
        "Layer kinds come from the file's 'layer_kinds' metadata (recorded by save_torch_layout and in every "
        "Flax-layout file), from --kinds, or from a Flax twin (--like). Buffers that are not parameters "
        "(position_ids, token_type_ids, num_batches_tracked, causal masks; --buffers for more) need no kind: "
        "they are left out of a Flax layout, kept in a torch layout, and named in the report.",
    )
    p.add_argument("source", help=_SOURCE_HELP)
    p.add_argument(
        "target",
        help="output: a .safetensors file, or a folder (a sharded checkpoint; with --max-shard-size, "
        "an existing folder, or a path ending in '/')",
    )
    p.add_argument(
        "--to",
        choices=("flax", "torch"),
        help="layout to write (default: the other layout; torch for a pickled source)",
    )
    _kinds_flags(p)
    p.add_argument(
        "--buffers",
        action="append",
        default=[],
        metavar="PATTERN",
        help="glob of more tensor names that are buffers, not parameters (e.g. '*.attn.bias'); repeatable",
    )
    _rename_flag(p, "rename tensors (glob, or 're:' regex); repeatable, first match wins")
    p.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="write a sharded checkpoint (files of at most SIZE, e.g. 2GB, 500MB, 2GiB, plus "
        "model.safetensors.index.json) into the folder TARGET; default 5GB when TARGET is a folder",
    )
    _progress_flags(p)
    p.set_defaults(run=_convert)

    p = sub.add_parser(
        "kinds",
        help="print the layer kinds {module: kind} of a Flax twin or of a checkpoint, as JSON for --kinds",
        description="With --like (and --config): the kinds of the twin's modules, from its module types. With "
        "SOURCE: the kinds recorded in it, plus --kinds (globs resolved against its modules). Redirect the "
        "output into a file and pass that file to 'convert --kinds'.",
    )
    p.add_argument("source", nargs="?", help=_SOURCE_HELP + " (optional)")
    _kinds_flags(p)
    p.set_defaults(run=_kinds_command)

    p = sub.add_parser(
        "merge",
        help="fold a LoRA adapter file into a base checkpoint: a plain merged base checkpoint",
        description="W += scaling * up @ down for every adapted layer (conv too), scaling = alpha / rank from the "
        "adapter file's metadata (a PEFT adapter's from its adapter_config.json). Houlsby adapters cannot be merged.",
    )
    p.add_argument(
        "base", help="base checkpoint (either layout; one file, a sharded folder or index, or a pickle)"
    )
    p.add_argument(
        "adapter",
        help="adapter checkpoint written by AdaptedModel.saver, or a PEFT LoRA adapter (its directory or its "
        "adapter_model.safetensors beside adapter_config.json)",
    )
    p.add_argument("output", help="merged .safetensors file (in the base file's layout)")
    p.add_argument("--rank", type=int, help="LoRA rank, for an adapter file without metadata")
    p.add_argument("--alpha", type=float, help="LoRA alpha, for an adapter file without metadata")
    _rename_flag(p, _ADAPTER_RENAME_HELP.format(names="the base file's"))
    _progress_flags(p)
    p.set_defaults(run=_merge)

    p = sub.add_parser(
        "peft-import",
        help="turn a PEFT LoRA adapter directory into one of our adapter checkpoints",
        description="Reads adapter_config.json and adapter_model.safetensors; refuses what our LoRA cannot "
        "compute exactly (DoRA on embeddings, biases, base-changing initialisations, ...). Per-layer ranks and "
        "alphas (rank_pattern/alpha_pattern) and modules_to_save are kept (metadata layer_adapter_kwargs, "
        "unfrozen layers). In PEFT's multi-adapter layout ('default' at the root, others in <name>/), "
        "--adapter-name picks one adapter and --selected-adapters writes several into one file.",
    )
    p.add_argument("peft_dir", help="PEFT adapter directory (save_pretrained output)")
    p.add_argument("output", help="adapter .safetensors file to write")
    _adapter_flags(p, "of the PEFT directory")
    _rename_flag(
        p,
        _ADAPTER_RENAME_HELP.format(names="the loading model's")
        + " (from Gemma3ForConditionalGeneration to the text twin: 'model.language_model.*' 'model.*')",
    )
    p.set_defaults(run=_peft_import)

    p = sub.add_parser(
        "peft-export",
        help="turn one of our LoRA adapter checkpoints into a PEFT adapter directory",
        description="Writes adapter_config.json and adapter_model.safetensors that "
        "peft.PeftModel.from_pretrained(base, DIR) loads; a file of several adapters (or --selected-adapters) "
        "in PEFT's multi-adapter layout: 'default' at the root, every other in DIR/<name>, which "
        "PeftModel.load_adapter(DIR/<name>, <name>) reads. Houlsby adapters and what PEFT's modules_to_save "
        "cannot hold are refused. An existing non-empty directory is left alone unless --force.",
    )
    p.add_argument(
        "adapter",
        help="adapter checkpoint written by AdaptedModel.saver (.safetensors or .ckpt) or by peft-import",
    )
    p.add_argument("output_dir", help="PEFT adapter directory to write")
    p.add_argument(
        "--base-model-name-or-path",
        "--base-model",
        dest="base_model",
        metavar="NAME",
        help="recorded in adapter_config.json as base_model_name_or_path",
    )
    p.add_argument(
        "--task-type", metavar="TASK", help="recorded in adapter_config.json as task_type (e.g. CAUSAL_LM)"
    )
    _adapter_flags(p, "of the adapter file (one written by peft-import --selected-adapters holds several)")
    p.add_argument(
        "--conv-geometry-checked",
        action="store_true",
        help="confirm that adapted convs use dilation 1 and padding_mode 'zeros' (PEFT cannot express others)",
    )
    p.add_argument(
        "--force", action="store_true", help="overwrite the adapter files of an existing directory"
    )
    _rename_flag(
        p,
        _ADAPTER_RENAME_HELP.format(names="PEFT's base model's")
        + " (from the Gemma 3 text twin to Gemma3ForConditionalGeneration: 'model.*' 'model.language_model.*')",
    )
    p.set_defaults(run=_peft_export)
    return parser


_ADAPTER_RENAME_HELP = (
    "rename the adapter's modules (the layers it adapts, and those it holds whole) to {names} names: "
    "PATTERN (glob, or 're:' regex) matched against module names, each module's tensors and per-layer "
    "ranks follow it; repeatable, first match wins, a rule matching no module is an error"
)


def _rename_flag(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument(
        "--rename", nargs=2, action="append", metavar=("PATTERN", "REPLACEMENT"), help=help_text
    )


def _rename_rules(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [(pattern, replacement) for pattern, replacement in args.rename or ()]


def _adapter_flags(parser: argparse.ArgumentParser, of: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--adapter-name", metavar="NAME", help=f"the one adapter {of} to convert (default: 'default')"
    )
    group.add_argument(
        "--selected-adapters",
        metavar="A,B",
        type=_names,
        help=f"several adapters {of}, comma-separated, to convert together",
    )


def _names(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated adapter names, got {value!r}")
    return names


def _kinds_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kinds", action="append", default=[], metavar="KINDS", help=_KINDS_HELP)
    parser.add_argument(
        "--like",
        metavar="MODULE:CLASS",
        help="a Flax NNX twin that describes the model (e.g. flax_impl.models:BertModel): its module types "
        "give every layer's kind; built abstractly (no memory)",
    )
    parser.add_argument(
        "--config", metavar="JSON", help="config.json for --like (e.g. transformers' config.json)"
    )


def _progress_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="always show progress (on stderr)",
    )
    group.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress")


def _show_progress(args: argparse.Namespace, *paths: str) -> bool:
    from .file_convert import PROGRESS_THRESHOLD

    if args.progress is not None:
        return args.progress
    if not sys.stderr.isatty():
        return False
    return sum(_size_on_disk(p) for p in paths) >= PROGRESS_THRESHOLD


def _size_on_disk(path: str) -> int:
    if os.path.isdir(path):
        return sum(f.stat().st_size for f in Path(path).glob("*.safetensors") if f.is_file())
    return os.path.getsize(path) if os.path.isfile(path) else 0


def _inspect(args: argparse.Namespace) -> None:
    from .files import ShardedCheckpoint, TensorFile

    with TensorFile(args.file) as f:
        names = f.names if args.limit <= 0 else f.names[: args.limit]
        width = max((len(n) for n in names), default=4)
        if isinstance(f, ShardedCheckpoint):
            shards = "sharded" if f.has_index else "one file, no index"
            print(f"checkpoint: {f.path} ({shards}, {len(f.files)} file(s))")
        else:
            print(f"file: {f.path}")
        print(f"layout: {f.layout} ({_LAYOUT_MEANS[f.layout]})")
        metadata = parse_metadata(f.metadata)
        if metadata:
            print("metadata:")
            for key in sorted(metadata):
                value = metadata[key]
                shown = value if isinstance(value, str) else json.dumps(value)
                print(f"  {key}: {shown}" + (f" ({_METADATA_MEANS[key]})" if key in _METADATA_MEANS else ""))
        else:
            print("metadata: (none)")
        print(f"tensors: {len(f.names)}")
        for name in names:
            dtype, shape = f.spec(name)
            where = f"  {f.file_of(name).name}" if isinstance(f, ShardedCheckpoint) else ""
            print(f"  {name:<{width}}  {dtype:<5} {str(list(shape)):<20} {_human(f.nbytes(name))}{where}")
        if len(names) < len(f.names):
            print(f"  ... ({len(f.names) - len(names)} more)")
        print(f"total: {_human(f.total_bytes)} ({f.total_bytes} bytes) in {len(f.names)} tensors")


def _convert(args: argparse.Namespace) -> None:
    from .file_convert import convert_file
    from .files import PICKLE_SUFFIXES, TensorFile
    from .sharded import DEFAULT_MAX_SHARD_BYTES, parse_size

    target = str(args.target)
    sharded = args.max_shard_size is not None or os.path.isdir(target) or target.endswith(("/", os.sep))
    if sharded and target.endswith(".safetensors"):
        raise ValueError(
            f"--max-shard-size writes a sharded checkpoint into a folder; {target!r} names a .safetensors file"
        )
    max_shard_bytes = None
    if sharded:
        max_shard_bytes = parse_size(args.max_shard_size) if args.max_shard_size else DEFAULT_MAX_SHARD_BYTES
    layout = args.to
    if layout is None:
        if str(args.source).endswith(PICKLE_SUFFIXES):
            layout = "torch"
        else:
            with TensorFile(args.source) as f:
                layout = "torch" if f.layout == "flax" else "flax"
    report = convert_file(
        args.source,
        target,
        layout=layout,
        layer_kinds=_layer_kinds(args),
        rename=_rename_rules(args),
        progress=_show_progress(args, args.source),
        max_shard_bytes=max_shard_bytes,
        buffers=args.buffers,
    )
    if sharded:
        from .files import ShardedCheckpoint

        written = ShardedCheckpoint(target)
        headline = (
            f"wrote {target} ({layout} layout, sharded: {len(written.files)} file(s), "
            f"{_human(written.total_bytes)})"
        )
    else:
        headline = f"wrote {target} ({layout} layout)"
    _print_report(report, headline)


def _kinds_command(args: argparse.Namespace) -> None:
    kinds: dict[str, str] = {}
    if args.source is not None:
        from .files import TensorFile
        from .views import file_layer_kinds

        with TensorFile(args.source) as f:
            kinds = file_layer_kinds(f, _layer_kinds(args))
    else:
        if not args.like and not args.kinds:
            raise ValueError("give --like MODULE:CLASS (with --config), or a SOURCE checkpoint")
        given = _layer_kinds(args) or {}
        from .views import resolve_kinds

        globbed = [m for m in given if set(m) & set("*?[")]
        if globbed:
            raise ValueError(f"glob patterns {globbed} need a SOURCE checkpoint to match against")
        kinds = resolve_kinds(given, [])
    print(json.dumps(kinds, indent=2))


# What `inspect` prints beside a file's layout and the metadata fields users asked about.
_LAYOUT_MEANS = {
    "torch": "how the tensors are named and laid out: PyTorch state_dict names, Linear weight (out, in)",
    "flax": "how the tensors are named and laid out: Flax NNX names, Linear kernel (in, out)",
}
_METADATA_MEANS = {
    "framework": "the framework that wrote the file; the layout line says how its tensors are laid out",
    "layer_kinds": "each layer's kind, so the file converts without guessing from names",
    "content": "adapter: adapters only; model: a whole model",
    "named_adapters": "the file's other adapters, under adapted_model.<layer>.named_adapters.<name>.",
    "adapter_name": "the name of the adapter under the one-adapter keys (else 'default')",
    "layer_adapter_kwargs": "layers whose rank or alpha differ (PEFT's rank_pattern/alpha_pattern)",
}


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
        rename=_rename_rules(args),
    )
    _print_report(report, f"wrote {args.output}")


def _peft_import(args: argparse.Namespace) -> None:
    from .peft import peft_adapter_names, peft_to_adapter_file

    report = peft_to_adapter_file(
        args.peft_dir,
        args.output,
        adapter_name=args.adapter_name,
        selected_adapters=args.selected_adapters,
        full=True,
        rename=_rename_rules(args),
    )
    if args.adapter_name is None and args.selected_adapters is None:
        others = [name for name in peft_adapter_names(args.peft_dir) if name != "default"]
        if others:
            report.notes.append(
                f"wrote the 'default' adapter only; the directory also holds {others}: "
                "--adapter-name NAME or --selected-adapters default,NAME,... convert them"
            )
    _print_report(report, f"wrote {args.output}")


def _peft_export(args: argparse.Namespace) -> None:
    from twinformat import peft_format

    from .peft import export_peft_adapter

    folder = Path(args.output_dir)
    if folder.exists() and not args.force:
        if not folder.is_dir():
            raise FileExistsError(f"{str(folder)!r} exists and is not a directory")
        if any(folder.iterdir()):
            raise FileExistsError(
                f"{str(folder)!r} already exists and is not empty; pass --force to overwrite its adapter files"
            )
    config = export_peft_adapter(
        args.adapter,
        args.output_dir,
        adapter_name=args.adapter_name,
        selected_adapters=args.selected_adapters,
        base_model_name_or_path=args.base_model,
        task_type=args.task_type,
        conv_geometry_checked=args.conv_geometry_checked,
        rename=_rename_rules(args),
    )
    configs = {None: config} if isinstance(config.get("peft_type"), str) else config
    for name, written in configs.items():
        where = (
            args.output_dir if name is None else peft_format.peft_adapter_subdirectory(args.output_dir, name)
        )
        print(
            f"wrote {where}{'' if name is None else f' (adapter {name!r})'}: r={written['r']}, "
            f"lora_alpha={written['lora_alpha']}, target_modules={written['target_modules']}"
        )


def _layer_kinds(args: argparse.Namespace) -> dict[str, str] | None:
    """``--kinds`` values (in order, earlier wins) then the kinds of the ``--like`` twin."""
    kinds: dict[str, str] = {}
    for value in args.kinds:
        for module, kind in _parse_kinds(value).items():
            kinds.setdefault(module, kind)
    if args.config and not args.like:
        raise ValueError("--config describes the --like twin; give --like MODULE:CLASS too")
    if args.like:
        from .file_convert import twin_layer_kinds

        for module, kind in twin_layer_kinds(args.like, args.config).items():
            kinds.setdefault(module, kind)
    return kinds or None


def _parse_kinds(value: str) -> dict[str, str]:
    """One ``--kinds`` value: a path to a JSON object, a JSON object, or ``MODULE=KIND[,...]``."""
    text = value.strip()
    if os.path.isfile(value):
        text = Path(value).read_text(encoding="utf-8")
    elif not text.startswith("{"):
        pairs = [item.strip() for item in text.split(",") if item.strip()]
        bad = [item for item in pairs if "=" not in item]
        if bad or not pairs:
            raise ValueError(
                f"--kinds takes MODULE=KIND pairs, a JSON object {{module: kind}} or a path to one; got {value!r}"
            )
        return dict(item.split("=", 1) for item in pairs)
    try:
        kinds = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"--kinds must be a JSON object {{module: kind}} or a path to one: {exc}") from None
    if not isinstance(kinds, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in kinds.items()
    ):
        raise ValueError("--kinds must be a JSON object {module: kind} of strings")
    return kinds


def _print_report(report: KeyReport, headline: str) -> None:
    """The headline, the counts and the three lists, then each note on a line of its own."""
    print(headline)
    print(f"loaded: {len(report.loaded)}")
    for label, keys in (
        ("missing", report.missing),
        ("unexpected", report.unexpected),
        ("mis-shaped", report.mismatched),
        ("notes", report.notes),
    ):
        if keys:
            print(f"{label} ({len(keys)}):")
            for key in keys:
                print(f"  {key}")


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover
