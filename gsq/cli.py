"""The `gsq` command line. Every subcommand is one entry of COMMANDS (name -> Command): a function
that declares its arguments and a function that runs it. Add a subcommand by adding an entry.

    gsq train [PRESET] [section.key=value ...] [--resume RUN] [--print-config]
    gsq info [PRESET ...]                      presets, their shapes and parameter counts
    gsq convert FLEX_GEN_CHECKPOINT OUT_DIR    an official flex_gen checkpoint as a gsq checkpoint
    gsq eval CHECKPOINT [--data DIR]           rFID, PSNR, SSIM, LPIPS, usage (docs/spec.md, "Evaluation")
    gsq encode CHECKPOINT IMAGES TOKENS.safetensors / gsq decode TOKENS OUT_DIR
    gsq experiment ablation                    the paper's codebook ablation at CPU scale

Under torchrun: `torchrun --nproc_per_node=8 -m gsq train F8-D64-G16-V8k data.path=...`.
User errors (bad config, missing data, bad checkpoint or token file, missing weights file, an output
that exists without --overwrite, a full disk) print one line and exit with status 2; an interrupted
training run exits with status 130 after saving its checkpoint.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from .config import PRESETS, ConfigError, apply_overrides, key_table, preset


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ------------------------------------------------------------------------------------------------
# gsq train


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "preset",
        nargs="?",
        default=None,
        help=f"one of {', '.join(PRESETS)} (default: tiny, the bundled-photos CPU run; with "
        "--resume: the checkpoint's config)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides, type-checked, e.g. train.steps=1000 data.path=/data/imagenet/train",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN",
        default=None,
        help="continue a run exactly: its run folder (the checkpoint `latest` names, or the newest "
        "intact one if that is damaged) or one of its checkpoint folders",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config (every key) and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train(args: argparse.Namespace) -> int:
    from . import checkpoint as ckpt

    if args.preset is not None and "=" in args.preset:  # `gsq train key=value ...` means tiny + overrides
        args.overrides.insert(0, args.preset)
        args.preset = None
    if args.resume:
        folder = ckpt.resume_point(args.resume)  # resolved here once: one warning if it falls back
        base = ckpt.read_config(folder)
        if args.preset is not None and args.preset != base.preset:
            raise ConfigError(f"--resume {args.resume} continues a {base.preset} run, not {args.preset}")
    else:
        base = preset(args.preset or "tiny")
    config = apply_overrides(base, args.overrides)
    if args.print_config:
        print(config.to_json())
        return 0
    from .train import train

    result = train(config, resume=folder if args.resume else None, progress=not args.no_progress)
    return 130 if result.interrupted else 0


# ------------------------------------------------------------------------------------------------
# gsq info


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("presets", nargs="*", help="presets to describe (default: all)")
    parser.add_argument(
        "--keys",
        action="store_true",
        help="list every config key instead: key, type and value in the first PRESET (default: tiny)",
    )


def _info(args: argparse.Namespace) -> int:
    import torch

    from .models import GSQTokenizer, count_parameters

    if args.keys:
        rows = key_table(preset(args.presets[0] if args.presets else "tiny"))
        widths = [max(len(row[column]) for row in rows) for column in (0, 1)]
        for key, kind, value in rows:
            print(f"{key:{widths[0]}}  {kind:{widths[1]}}  {value}")
        return 0
    for name in args.presets or list(PRESETS):
        config = preset(name)
        m = config.model
        with torch.device("meta"):  # shapes only: nothing is allocated
            model = GSQTokenizer(m)
        total = count_parameters(model)
        parts = ", ".join(
            f"{part} {count_parameters(getattr(model, part)) / 1e6:.2f}M"
            for part in ("encoder", "quantizer", "decoder")
        )
        tokens = config.data.image_size // m.downsampling
        print(
            f"{name:17s} {total / 1e6:6.2f}M parameters ({parts}); F{m.downsampling}, D={m.latent_channels} = "
            f"{m.groups} x {m.latent_channels // m.groups}, V={m.codebook_size:,}; "
            f"{config.data.image_size}px -> {tokens}x{tokens}x{m.groups} tokens"
        )
    return 0


# ------------------------------------------------------------------------------------------------
# gsq convert


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help="flex_gen checkpoint: a FlexTokenizer .pt (model_state_dict), a trainer "
        "checkpoint (model / ema_model) or a .safetensors state dict",
    )
    parser.add_argument("output", help="folder for the gsq checkpoint (weights only)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="overrides of the inferred config (e.g. model.l2_normalize=false for a checkpoint trained "
        "without the l2 lookup; it cannot be read from the weights)",
    )
    parser.add_argument(
        "--weights",
        choices=("ema", "model"),
        default="ema",
        help="which weights of a trainer checkpoint to take (default: ema)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a gsq checkpoint already at OUTPUT (never a file or a folder of other files)",
    )


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint

    with warnings.catch_warnings(record=True) as caught:  # each assumption as one line, not Python's two
        warnings.simplefilter("always")
        try:
            folder = convert_checkpoint(
                args.checkpoint, args.output, overrides=args.overrides, which=args.weights, overwrite=args.overwrite
            )
        finally:
            for warning in caught:
                print(f"gsq convert: warning: {warning.message}", file=sys.stderr)
    print(f"converted {args.checkpoint} -> {folder}")
    return 0


# ------------------------------------------------------------------------------------------------
# gsq eval


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", help="checkpoint folder, run folder (its newest checkpoint) or checkpoints folder"
    )
    parser.add_argument("--data", default="", help="image folder (recursive); default: the run's validation images")
    parser.add_argument("--image-size", type=int, default=0, help="center crop (default: the run's data.image_size)")
    parser.add_argument("--resize", type=int, default=0, help="short side before the crop (default: 292/256 of it)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-images", type=int, default=0, help="evaluate at most this many (default: all)")
    parser.add_argument("--weights", choices=("ema", "generator"), default="ema")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--inception-weights",
        default="",
        help="InceptionV3 file (torch-fidelity's weights-inception-2015-12-05-6726825d.pth); else "
        "$GSQ_INCEPTION_WEIGHTS; else the hub",
    )
    parser.add_argument(
        "--alexnet-weights",
        default="",
        help="torchvision AlexNet file for LPIPS; else $GSQ_ALEXNET_WEIGHTS; else the hub",
    )
    parser.add_argument("--output", default="", help="report folder (default: <run>/eval/<checkpoint>)")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="DataLoader workers (default: 4, or the CPU cores this process may use if fewer)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report.json / grid.png")
    parser.add_argument("--no-progress", action="store_true")


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import EvalConfig, default_workers, evaluate_checkpoint
    from .extras import require_for_evaluation

    require_for_evaluation()
    evaluate_checkpoint(
        EvalConfig(
            checkpoint=args.checkpoint,
            data=args.data,
            image_size=args.image_size,
            resize=args.resize,
            batch_size=args.batch_size,
            max_images=args.max_images,
            weights=args.weights,
            device=args.device,
            inception_weights=args.inception_weights,
            alexnet_weights=args.alexnet_weights,
            output=args.output,
            num_workers=default_workers() if args.num_workers is None else args.num_workers,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    )
    return 0


# ------------------------------------------------------------------------------------------------
# gsq encode / gsq decode


def _encode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder or run folder")
    parser.add_argument("images", help="an image file or a folder of images (recursive)")
    parser.add_argument("output", help="token file to write (.safetensors)")
    parser.add_argument("--image-size", type=int, default=0, help="center crop (default: the run's data.image_size)")
    parser.add_argument("--resize", type=int, default=0, help="short side before the crop (default: the crop size)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--weights", choices=("ema", "generator"), default="ema")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing token file")
    parser.add_argument("--no-progress", action="store_true")


def _encode(args: argparse.Namespace) -> int:
    from .tokens import encode_images, read_tokens

    path = encode_images(
        args.checkpoint,
        args.images,
        args.output,
        image_size=args.image_size,
        resize=args.resize,
        batch_size=args.batch_size,
        device=args.device,
        weights=args.weights,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    print(f"wrote {tuple(read_tokens(path).indices.shape)} tokens (N, h, w, G) to {path}")
    return 0


def _decode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tokens", help="token file written by `gsq encode`")
    parser.add_argument("output", help="folder for the decoded PNG images")
    parser.add_argument(
        "--checkpoint", default=None, help="decode with this checkpoint (default: the one that made the tokens)"
    )
    parser.add_argument("--force", action="store_true", help="decode even if the checkpoint did not make the tokens")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing images of the same names (by default an existing file is never replaced)",
    )


def _decode(args: argparse.Namespace) -> int:
    from .data import refuse_existing
    from .tokens import decode_tokens, image_paths, read_tokens, write_images

    tokens = read_tokens(args.tokens)
    refuse_existing(image_paths(tokens.metadata["files"], args.output), args.overwrite)  # before decoding
    images = decode_tokens(tokens, args.checkpoint, device=args.device, batch_size=args.batch_size, force=args.force)
    written = write_images(images, tokens.metadata["files"], args.output, overwrite=args.overwrite)
    print(f"wrote {len(written)} images to {args.output}")
    return 0


# ------------------------------------------------------------------------------------------------
# gsq experiment


def _experiment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name",
        choices=("ablation",),
        help='ablation: the paper\'s codebook ablation (docs/spec.md, section "Evaluation")',
    )
    parser.add_argument("--output", default="runs/ablation", help="folder for the arms' runs and the table")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per arm")
    parser.add_argument("--arms", default="abcde", help="which arms to run (default: abcde)")
    parser.add_argument("--no-progress", action="store_true")


def _experiment(args: argparse.Namespace) -> int:
    from .experiments import run_ablation

    run_ablation(args.output, steps=args.steps, arms=args.arms, progress=not args.no_progress)
    return 0


COMMANDS: dict[str, Command] = {
    "train": Command("train a GSQ-GAN tokenizer (default: tiny on the bundled photos)", _train_arguments, _train),
    "info": Command("presets, shapes and parameter counts", _info_arguments, _info),
    "convert": Command("convert an official flex_gen GSQ checkpoint", _convert_arguments, _convert),
    "eval": Command("evaluate a checkpoint: rFID, PSNR, SSIM, LPIPS, codebook usage", _eval_arguments, _eval),
    "encode": Command("images -> token file", _encode_arguments, _encode),
    "decode": Command("token file -> images", _decode_arguments, _decode),
    "experiment": Command("reproduce an experiment of the paper at CPU scale", _experiment_arguments, _experiment),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gsq", description="GSQ-GAN image tokenizer (Grouped Spherical Quantization)."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.add_arguments(subparsers.add_parser(name, help=command.help, description=command.help))
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .convert import ConversionError
    from .data import DataError, OutputExistsError
    from .extras import MissingExtra
    from .pretrained import WeightsFileError, WeightsUnavailable
    from .tokens import TokenFileError

    return (
        ConfigError,
        CheckpointError,
        ConversionError,
        DataError,
        TokenFileError,
        WeightsFileError,
        WeightsUnavailable,
        FileNotFoundError,
        OutputExistsError,
        MissingExtra,
    )


def _one_line_warnings(command: str, default: Callable) -> Callable:
    """A warnings.formatwarning that shows gsq's own warnings as `gsq COMMAND: warning: ...`, one
    line without Python's file:line prefix and source line (they point into gsq, not at the user's
    mistake); other packages' warnings keep Python's format."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def format_warning(message, category, filename, lineno, line=None) -> str:
        if os.path.abspath(filename).startswith(package):
            return f"gsq {command}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    return format_warning


_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    warnings.simplefilter("default")  # show each distinct warning once (fallbacks, skipped images)
    default_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warnings(args.command, default_format)
    try:
        return COMMANDS[args.command].run(args)
    except _user_errors() as error:
        print(f"gsq {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in _NO_SPACE:
            raise
        print(
            f"gsq {args.command}: error: no space left on the device of {error.filename or 'an output file'}: "
            f"{error.strerror}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"gsq {args.command}: aborted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = default_format


if __name__ == "__main__":
    sys.exit(main())
