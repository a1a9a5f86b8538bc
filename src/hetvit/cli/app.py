"""The ``hetvit`` app and how it speaks to a user: one-line errors for whatever a user can fix
(bad options included), tracebacks only for bugs, and help that shows flags as flags."""

from __future__ import annotations

import importlib
import shutil
from typing import Annotated, Any

import typer

from ..errors import HetvitError

_click_errors = importlib.import_module(typer.BadParameter.__module__)
"""click's exceptions: click's own module, or the copy newer typers vendor, whichever this typer
raises."""


RICH_HELP_COLUMNS = 120
"""The narrowest terminal that gets typer's boxed help. That layout gives option names, negative
flags and types (ranges included) a column each before the description, which an 80-column
terminal squeezes to a word or two a line; below this width (and in a pipe) the help is click's
plain two-column layout, which wraps to the terminal instead."""


class _Help:
    """What every command's ``--help`` shares: typer's boxed layout only where it fits
    (:data:`RICH_HELP_COLUMNS`), and no ``<bool>`` label on ``--help``: typer labels every bool
    option so, which reads as if it wanted a value, and :func:`flag` clears it on the others."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option

    def format_help(self, ctx: Any, formatter: Any) -> None:
        if shutil.get_terminal_size().columns >= RICH_HELP_COLUMNS:
            return super().format_help(ctx, formatter)  # type: ignore[misc]
        mode, self.rich_markup_mode = self.rich_markup_mode, None  # typer's switch to plain
        try:
            return super().format_help(ctx, formatter)  # type: ignore[misc]
        finally:
            self.rich_markup_mode = mode


class _Command(_Help, typer.core.TyperCommand):
    pass


class _Group(_Help, typer.core.TyperGroup):
    """The ``hetvit`` group, whose usage errors (an unknown option, a missing one, a value out
    of range) read as one line in the style of :func:`fail`, instead of typer's boxed five."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except _click_errors.ClickException as e:
            if type(e).__name__ != "NoArgsIsHelpError":  # that one has printed the help
                command = e.ctx.command_path if getattr(e, "ctx", None) else "hetvit"
                usage = isinstance(e, _click_errors.UsageError)
                _print_error(e.format_message().rstrip(".")
                             + (f" (see '{command} --help')" if usage else ""))
            raise SystemExit(e.exit_code) from None
        except typer.Abort:
            _print_error("aborted")
            raise SystemExit(1) from None
        raise SystemExit(code if isinstance(code, int) else 0)


class _App(typer.Typer):
    """The app, whose commands are :class:`_Command` unless they ask for another class."""

    def command(self, *args: Any, cls: Any = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or _Command, **kwargs)


app = _App(
    cls=_Group,
    help="hetvit: make pretrained Vision Transformers faster with static early attention "
    "(DGSSA) and a token aggregation pyramid (GLAD).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    add_completion=False,
)


def _print_version(given: bool) -> None:
    if given:
        from .. import __version__

        typer.echo(f"hetvit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", metavar="", is_eager=True, callback=_print_version,
        help="Print hetvit's version and exit.")] = False) -> None:
    """The options of ``hetvit`` itself, before the verb (the help text is the app's)."""


def main() -> None:
    """The ``hetvit`` entry point: warnings as one readable line each, then the app."""
    import warnings

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: object = None, line: str | None = None) -> None:
        from rich.console import Console

        Console(stderr=True).print(f"[yellow]warning:[/] {message}", highlight=False)

    warnings.showwarning = show  # one readable line per warning, no source dump
    # Lightning's own deprecation notice about torch internals: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    app()


def flag(*names: str, **kwargs: Any) -> Any:
    """A boolean option, which takes no value (``--json``, never ``--json true``).

    typer labels a bool option ``<bool>`` in the help, which reads as if it wanted a value;
    an empty metavar leaves the type column blank, as for any flag.
    """
    return typer.Option(*names, metavar="", **kwargs)


# --- clear errors -------------------------------------------------------------------------------
USER_ERRORS: tuple[type[Exception], ...] = (HetvitError, OSError)
"""What a user can fix: the library's errors and the file system's. Anything else is a bug, and
keeps its traceback."""


def fail(message: str, code: int = 2) -> None:
    """Print a short error (no traceback) and exit with status ``code``: 2, bad input, unless
    the command documents another (``hetvit export``: 1 for failed checks).

    Long messages (a state-dict mismatch lists every tensor) keep their first lines.
    """
    lines = message.splitlines()
    if len(lines) > 4:
        message = "\n".join(lines[:4]) + f"\n... ({len(lines) - 4} more lines)"
    _print_error(message)
    raise typer.Exit(code)


def _print_error(message: str) -> None:
    from rich.console import Console

    # soft_wrap: the terminal wraps; no newlines inside the message for logs and grep
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


class user_errors:  # noqa: N801 - used as a context manager, reads like a statement
    """Turn the library's clear exceptions into a clean CLI error instead of a traceback."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is not None and isinstance(exc, USER_ERRORS) and not isinstance(exc, typer.Exit):
            fail(str(exc))
        return False
