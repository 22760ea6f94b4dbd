"""The ``fastpadim`` app: every command in one list, one-line errors, ``--version``/``-h``, and ``main()``."""

from __future__ import annotations

import sys
import warnings
from typing import Annotated, Any

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer 0.29 bundles click
from typer.core import TyperGroup

from . import calibrate, demo, evaluate, export, fit, info, predict, records, serve, update, watch
from .console import missing_module, out, print_error, state


def usage_message(exc: Exception) -> str:
    """typer's usage error (a box with the usage text) as one line that says what to do."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    message = message[:1].lower() + message[1:]
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "fastpadim"
    return f"{message} (see '{command} -h')"


class OneLineErrors(TyperGroup):
    """The ``fastpadim`` group: every error is one line on stderr. typer prints usage errors as a box with the
    usage text (several lines); here they become ``error: …`` with exit code 2. Python warnings are not shown
    (``--debug`` shows them)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
        args = list(sys.argv[1:] if args is None else args)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # --debug turns them back on (see _main)
            try:
                code = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                                    **extra)
            except NoArgsIsHelpError:
                sys.exit(2)  # the help text is already printed
            except ClickException as exc:
                print_error(usage_message(exc))
                sys.exit(exc.exit_code)
            except typer.Abort:
                print_error("aborted")
                sys.exit(1)
            except ModuleNotFoundError as exc:
                # The light install (fastpadim[runtime]) has no PyTorch engine: say which extra a command needs.
                if "--debug" in args:
                    raise
                print_error(missing_module(exc))
                sys.exit(1)
        # Without standalone mode, click returns the command's value or the code of a typer.Exit.
        sys.exit(code if isinstance(code, int) else 0)


def show_version(value: bool) -> None:
    if value:
        from .. import __version__

        out.print(f"fastpadim {__version__}", highlight=False)
        raise typer.Exit()


app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="PaDiM anomaly detection: fit on good images, score new ones.")


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors, and Python warnings.")] = False,
          version: Annotated[bool, typer.Option("--version", callback=show_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    state["debug"] = debug
    if debug:
        warnings.simplefilter("default")


# Every command, in the order of `fastpadim -h`: the one place where commands are registered.
COMMANDS = [
    ("fit", fit.fit),
    ("predict", predict.predict),
    ("watch", watch.watch),
    ("calibrate", calibrate.calibrate),
    ("update", update.update),
    ("info", info.info),
    ("records", records.records),
    ("demo", demo.demo),
    ("evaluate", evaluate.evaluate),
    ("serve", serve.serve),
    ("export", export.export),
    ("set-threshold", export.set_threshold),
]
for _name, _command in COMMANDS:
    app.command(_name)(_command)


def expand_bare_ray(argv: list[str]) -> list[str]:
    """``--ray`` given without a value means ``--ray local`` (typer options cannot take an optional value)."""
    expanded = []
    for i, arg in enumerate(argv):
        expanded.append(arg)
        if arg == "--ray" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            expanded.append("local")
    return expanded


def main() -> None:
    app(args=expand_bare_ray(sys.argv[1:]))  # OneLineErrors.main: one line per error, the exit code
