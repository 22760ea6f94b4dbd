"""What the command line shows: one console on stderr for messages, one on stdout for results, one line per
error (a traceback only with --debug), progress bars, and the extra to install when a package is missing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
)
from rich.text import Text

from ..errors import FastpadimError

# The extra that provides a module the light install (fastpadim[runtime]) lacks; anything else: the PyTorch engine.
EXTRAS = {"ray": "ray", "pyarrow": "ray", "av": "video", "onnxruntime": "runtime", "openvino": "openvino"}
state = {"debug": False}


class OneLineConsole(Console):
    """Output to a file or pipe is not wrapped at 80 columns (a line stays one line for grep and logs); a terminal
    keeps rich's wrapping at its width."""

    def print(self, *objects: Any, soft_wrap: bool | None = None, **kwargs: Any) -> None:
        if soft_wrap is None and not self.is_terminal:
            soft_wrap = True
        super().print(*objects, soft_wrap=soft_wrap, **kwargs)


console = OneLineConsole(stderr=True)
out = OneLineConsole()


def say(message: str) -> None:
    console.print(message, highlight=False, soft_wrap=True)


def print_error(message: str) -> None:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)


def report_skipped(skipped: list[tuple[str, str]]) -> None:
    for _name, reason in skipped:
        console.print(f"[yellow]skipped:[/yellow] {escape(reason)}", highlight=False, soft_wrap=True)


def missing_module(exc: ModuleNotFoundError) -> str:
    module = (exc.name or "").split(".")[0]
    return (f"this needs the Python package {module!r}, which is not installed: "
            f"pip install 'fastpadim[{EXTRAS.get(module, 'full')}]'")


def fail(message: str, code: int = 1):
    print_error(message)
    raise typer.Exit(code)


@contextmanager
def user_errors():
    """One line per error, exit code 1; the traceback only with --debug."""
    try:
        yield
    except FastpadimError as exc:
        if state["debug"]:
            raise
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except (typer.Exit, typer.Abort, ModuleNotFoundError):
        raise  # a missing module: the app names the extra to install
    except Exception as exc:  # noqa: BLE001
        if state["debug"]:
            raise
        fail(f"unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (run with --debug for details)")


class _Rate(ProgressColumn):
    def render(self, task):
        return Text(f"{task.speed:.1f} images/s" if task.speed else "– images/s")


@contextmanager
def progress_bar(description: str, total: int | None, rate: bool = False) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (shown on a terminal only); yields the advance(n) callback fastpadim's loops
    take. ``rate`` shows images per second (over all Ray workers) instead of the time left."""
    last = _Rate() if rate else TimeRemainingColumn()
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), last]
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
