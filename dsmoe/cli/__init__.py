"""The `dsmoe` command line: train, generate, experts, compare, bench, info.

Errors the user can fix (bad paths, configs, checkpoints, arguments) are printed as one line,
``dsmoe: error: ...``, with exit status 2; set DSMOE_DEBUG=1 to see the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .common import CLIError

COMMANDS = {
    "train": ("train a DeepSeekMoE language model (defaults: a small model on the Python stdlib's sources)", "train"),
    "generate": ("generate text from a checkpoint, streaming", "generate"),
    "experts": ("expert load heatmaps and the top-expert ablation of the paper", "experts"),
    "compare": ("dense vs GShard top-2 vs DeepSeekMoE at the same activated FLOPs and budget", "compare"),
    "bench": ("time the MoE layer: dsmoe ops vs the plain PyTorch reference", "bench"),
    "info": ("build information, torch, devices", "info"),
}


def _module(name: str):
    import importlib

    return importlib.import_module(f"{__name__}.{COMMANDS[name][1]}")


class _Parser(argparse.ArgumentParser):
    """argparse's own usage errors in the same one-line form (exit 2)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        prefix = f"{self.prog.split()[-1]}: " if " " in self.prog else ""
        raise SystemExit(_fail(prefix + message))


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or with ``only`` the options of that command alone: the others
    are listed but not imported (importing a command imports torch, which takes seconds)."""
    parser = _Parser(prog="dsmoe", description="DeepSeekMoE on fast fine-grained MoE operators.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_text, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            _module(name).add_arguments(p)
    return parser


def _command_in(argv: list[str]) -> str:
    """The subcommand named in ``argv`` ("" if none): the top level has no option that takes a
    value, so it is the first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), "")


def _fail(message: str) -> int:
    print(f"dsmoe: error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dsmoe` console script (and ``python -m dsmoe``); returns the exit
    status (0 ok, 2 user error, 130 interrupted)."""
    debug = os.environ.get("DSMOE_DEBUG", "") not in ("", "0")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(only=_command_in(argv))
        ns = parser.parse_args(argv)
        if ns.version:
            import dsmoe

            print(f"dsmoe {dsmoe.__version__}")
            return 0
        if ns.command is None:
            parser.print_help()
            return 2
        return int(_module(ns.command).run(ns) or 0)
    except SystemExit as e:  # argparse (help, usage errors)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else _fail(str(e.code)))
    except CLIError as e:
        if debug:
            raise
        return _fail(str(e))
    except KeyboardInterrupt:
        print("\ndsmoe: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, TypeError, RuntimeError, json.JSONDecodeError) as e:
        # the model package and torch report bad input (and e.g. out-of-memory) with these: the
        # message, not a traceback
        if debug:
            raise
        return _fail(f"{_one_line(e)} (DSMOE_DEBUG=1 shows the traceback)")


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
