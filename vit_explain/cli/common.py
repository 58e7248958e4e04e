"""What the CLI's commands share: the stderr line handler, one-line errors, the settings checks.

Kept apart from ``__init__`` (which builds the click group from the command modules) so that the
command modules import this and never their own package: no import circle. Imports no numpy,
onnxruntime or torch at import time: ``vit-explain --help`` loads every command module.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

import click

from ..errors import VitExplainError

#: The CLI's own progress lines; the library's modules log under "vit_explain.<module>".
logger = logging.getLogger("vit_explain.cli")

#: ``--device``, one definition for every command that opens a model.
device_option = click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
    help="Where onnxruntime runs: auto takes CUDA when onnxruntime-gpu and a GPU are there.",
)


class _StderrLines(logging.Handler):
    """Each record as its bare message on stderr, the lines users saw before there was logging;
    through the progress bar's ``write`` while one is drawn, so the bar is not torn."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.bar = None  # a tqdm bar while explain draws one
        self.export_steps = False  # True while the export command runs (see showing_export_steps)
        self.addFilter(self._not_export_steps)

    def _not_export_steps(self, record: logging.LogRecord) -> bool:
        """A first-run export inside explain/evaluate is one line (model_store's), as before:
        the exporter's own steps are the ``export`` command's to show."""
        return record.levelno >= logging.WARNING or self.export_steps or not record.name.startswith("vit_explain.export")

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            click.echo(message, err=True)  # sys.stderr as it is now: click's test runner swaps it


#: The one handler; explain sets its ``bar`` while a progress bar is drawn.
LINES = _StderrLines()


@contextlib.contextmanager
def progress_lines() -> Iterator[None]:
    """The one stderr handler, on the "vit_explain" logger for one command (INFO; a command's
    ``-q`` raises it to WARNING), and not passed on to the root logger: an application that
    configured logging gets no second copy, and the library stays silent outside the CLI."""
    package = logging.getLogger("vit_explain")
    level, propagate = package.level, package.propagate
    package.addHandler(LINES)
    package.setLevel(logging.INFO)
    package.propagate = False
    try:
        yield
    finally:
        package.removeHandler(LINES)
        package.setLevel(level)
        package.propagate = propagate
        LINES.setLevel(logging.INFO)


@contextlib.contextmanager
def showing_export_steps() -> Iterator[None]:
    """The exporter's own progress lines (logger ``vit_explain.export``) shown, for the
    ``export`` command; elsewhere a first-run export stays one line."""
    LINES.export_steps = True
    try:
        yield
    finally:
        LINES.export_steps = False
        LINES.bar = None


def set_quiet(quiet: bool) -> None:
    """``-q``: warnings (a failed or skipped input) still show, progress lines do not."""
    LINES.setLevel(logging.WARNING if quiet else logging.INFO)


class UserError(click.ClickException):
    """A VitExplainError shown as one line (exit code 1)."""


def fail(exc: Exception) -> click.ClickException:
    """The exception as click's one ``Error:`` line with exit code 1 (raise the result ``from None``)."""
    return UserError(str(exc))


#: The CLI's name for each setting a SettingsError may name or blame.
FLAGS = {
    "method": "--method", "head_fusion": "--head-fusion", "discard_ratio": "--discard-ratio",
    "start_layer": "--start-layer", "category_index": "--category-index",
}


def bad_settings(error) -> click.BadParameter:
    """A :class:`~vit_explain.methods.SettingsError` as a usage error: the Python API's sentence
    with the flags' names, pointing at the option to change."""
    return click.BadParameter(error.message_for(FLAGS.__getitem__), param_hint=FLAGS[error.blame])


def open_explainer(model: str | None, device: str, threads: int | None):
    """The runtime for ``--model`` (a file, or a name exported once into the cache); imported
    here, not at the top, so ``--help`` never loads onnxruntime."""
    from ..model_store import DEFAULT_MODEL, resolve_model
    from ..runtime import Explainer

    try:
        return Explainer(resolve_model(model or DEFAULT_MODEL), device=device, threads=threads)
    except VitExplainError as exc:
        raise fail(exc) from None


def check_categories(category_index: tuple[int, ...], meta) -> tuple[int, ...] | None:
    """``--category-index`` values checked against the model's outputs (a usage error, which
    click can only raise once the model is open), or None when none was given."""
    for index in category_index:
        if index >= meta.num_outputs:
            kind = "classes" if meta.output_kind == "logits" else "output features"
            raise click.BadParameter(
                f"{index} is out of range: the model has {meta.num_outputs} {kind} (0..{meta.num_outputs - 1})",
                param_hint="--category-index",
            )
    return tuple(category_index) or None
