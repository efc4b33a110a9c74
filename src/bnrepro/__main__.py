"""bnrepro: reproduce the experiments of Ioffe & Szegedy (2015).

Short on purpose: parse, print the config, call the experiment.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import time
import typing
from pathlib import Path
from typing import List, Optional

from . import config as configs
from .data import DataError
from .runtime import RUN_FLAGS, UsageError, check_output_dir, check_records_clean, distributed

EXPERIMENTS = {
    "figure1": ("Figure 1: MNIST MLP with and without BN (Section 4.1)", "Figure1Config", "figure1"),
    "small-batch": ("Beyond the paper: BN, Batch Renorm and ghost batches as the batch shrinks (Fashion-MNIST)",
                    "SmallBatchConfig", "small_batch"),
    "inception": ("Figures 2 and 3: a small Inception and its BN variants (Section 4.2, Fashion-MNIST)",
                  "InceptionConfig", "inception"),
    "ensemble": ("Section 4.2.3: an ensemble of BN-x30-based networks (Fashion-MNIST)", "EnsembleConfig", "ensemble"),
}


class _Parser(argparse.ArgumentParser):
    """Errors on one line: what was wrong, and what is accepted."""

    accepted = ""  # set by build_parser: the commands or options this parser takes

    def error(self, message: str) -> None:  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}" + (f" (accepted: {self.accepted})" if self.accepted else "")
                  + "\n")


def _add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        base = hint
        if typing.get_origin(hint) is typing.Union:  # Optional[X] -> X
            base = next(a for a in typing.get_args(hint) if a is not type(None))
        if base is bool:
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                                type=_parse_bool, metavar="BOOL", help=f"(default {f.default})")
        elif typing.get_origin(base) in (tuple, list):
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, nargs="+",
                                type=typing.get_args(base)[0], metavar=f.name.upper(),
                                help=f"(default {' '.join(map(str, f.default))})")
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, type=base,
                                metavar=f.name.upper().replace("_", "-"), help=f"(default {f.default})")


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def build_parser() -> "tuple[argparse.ArgumentParser, dict]":
    """The CLI's parser and its sub-parsers by command name."""
    parser = _Parser(prog="bnrepro", description="Reproduce the experiments of Ioffe & Szegedy (2015), "
                     "'Batch Normalization'. Every command writes metrics.json, figures and report.md.")
    parser.accepted = "commands: " + ", ".join(EXPERIMENTS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subs = {}
    for name, (help_text, cls_name, _) in EXPERIMENTS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--out", metavar="DIR", default=None,
                       help=f"output directory (default runs/{name}/<timestamp>)")
        p.add_argument("--quick", action="store_true", help="a short run (the smoke test)")
        p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--debug", action="store_true", help="show a traceback for errors, not one line")
        p.add_argument("--allow-dirty", action="store_true",
                       help="write into records/ even from a tree with uncommitted changes (noted in the provenance)")
        _add_config_flags(p, getattr(configs, cls_name))
        p.accepted = "--out DIR, --quick, --resume, --quiet, --debug, --allow-dirty, " + ", ".join(
            f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(getattr(configs, cls_name)))
        subs[name] = p
    return parser, subs


def make_config(args: argparse.Namespace, cls):
    cfg = cls()
    if args.quick:
        cfg = dataclasses.replace(cfg, **cls.QUICK)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}
    if overrides:
        cfg = dataclasses.replace(cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    configs.validate(cfg)
    return cfg


def main(argv: Optional[List[str]] = None) -> int:
    parser, subs = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        (subs[args.command] if args.command else parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    sub = subs[args.command]
    _, cls_name, module_name = EXPERIMENTS[args.command]
    try:
        cfg = make_config(args, getattr(configs, cls_name))
    except ValueError as exc:
        sub.error(str(exc))
    if args.resume and not args.out:
        sub.error("--resume needs the --out directory of the run to continue")
    try:
        return _run(args, cfg, module_name)
    except (UsageError, DataError) as exc:
        if args.debug:
            raise
        # One line, what was wrong and what was expected; --debug shows the traceback.
        print(f"bnrepro {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, cfg, module_name: str) -> int:
    out = Path(args.out) if args.out else Path("runs") / args.command / time.strftime("%Y%m%d-%H%M%S")
    if args.resume and not out.is_dir():
        raise UsageError(f"--out {out}: no such directory to resume from (--resume continues an earlier run)")
    rank, world = distributed()  # under torchrun: rank 0 alone prints and writes
    if rank == 0:
        check_records_clean(out, args.allow_dirty)
        RUN_FLAGS["allow_dirty"] = args.allow_dirty
        check_output_dir(out)  # before any training: a run must not fail at its last step
        print(f"bnrepro {args.command}: writing to {out}" + (f" ({world} processes)" if world > 1 else ""))
        for f in dataclasses.fields(cfg):
            print(f"  {f.name} = {getattr(cfg, f.name)}")
    module = importlib.import_module(f"bnrepro.experiments.{module_name}")
    metrics = module.run(cfg, out, resume=args.resume, quiet=args.quiet)
    if metrics is not None:
        print(module.headline(metrics))
        print(f"wrote {', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
