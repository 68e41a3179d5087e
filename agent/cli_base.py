"""A small command-line front shared by the three console commands.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``
and is imported only when chosen, so ``telematics-agent check-config`` does not pay for python-can.
Expected failures raise :class:`CommandError` and end as one clear line on stderr and exit status 2;
never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from agent import __version__


class CommandError(Exception):
    """An expected failure (bad input, unreachable device): printed as one line, exit status 2."""


def dispatch(prog: str, description: str, commands: dict[str, tuple[str, str]], argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run the chosen subcommand; ``commands`` maps name -> (module, help)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in commands.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(_module=module)
    args = parser.parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except CommandError as exc:
        print(f"{prog} {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `... | head` closed the pipe: not an error worth a traceback.
        sys.stderr.close()
        return 0
