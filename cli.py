"""`fedclif`: the one command line, the roof over the floors. It builds the parser from
each floor's own commands (shared, client, server, simulations), sets up logging, and
turns a user's mistake into a message and a non-zero exit instead of a traceback."""

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from rich.markup import escape

from fedclif.client import commands as client_commands
from fedclif.server import commands as server_commands
from fedclif.shared import commands as shared_commands
from fedclif.shared.clif.site import SiteInvalid
from fedclif.shared.errors import FedclifError
from fedclif.shared.ui import console, setup_logging
from fedclif.simulations import commands as simulation_commands


def _add(subparsers, name: str, fn: Callable | None, help_: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help=help_, description=help_)
    p.set_defaults(fn=fn)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedclif",
        description="Federated training of EHR foundation models on CLIF ICU data. "
        "New here? Run `fedclif quickstart`.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    # Command groups that several floors add to.
    groups = {}
    for name, help_ in (
        ("site", "commands a hospital runs on its own data"),
        ("tokenizer", "fit the shared tokenizer"),
    ):
        groups[name] = _add(sub, name, None, help_).add_subparsers(
            dest=f"{name}_command", required=True
        )
    for floor in (shared_commands, client_commands, server_commands, simulation_commands):
        floor.register(sub, groups, _add)
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, taking `section.key=value` settings wherever they stand: argparse alone
    rejects them after an option when a positional (a directory) comes first."""
    args, extra = parser.parse_known_args(argv)
    settings = [e for e in extra if "=" in e and not e.startswith("-")]
    if extra != settings or (settings and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if settings:
        args.overrides = [*args.overrides, *settings]
    return args


def _terminate(signum, frame) -> None:
    # SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C, so what the command started (a
    # simulation engine's SuperLink, ServerApp and Ray) is stopped on the way out rather
    # than left running.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    setup_logging(args.debug)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return args.fn(args)
    except SiteInvalid as e:
        shared_commands.print_report(e.report)
        console.print(f"[red bold]error:[/] {escape(str(e))}", soft_wrap=True)
        return 1
    # Unwritable output or a full disk is the user's to fix too, not a bug. Messages quote
    # data and codes: never read as markup.
    except (FedclifError, OSError) as e:
        console.print(f"[red bold]error:[/] {escape(str(e))}", soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    except Exception as e:
        if args.debug:
            raise
        console.print(
            f"[red bold]internal error[/] ({type(e).__name__}): {escape(str(e))}\n"
            "This is a fedclif bug; rerun with --debug for the traceback."
        )
        return 3
    finally:
        if previous is not None:  # main() also runs inside other programs (tests)
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
