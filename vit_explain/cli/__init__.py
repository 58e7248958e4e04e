"""The ``vit-explain`` command line: export, explain, evaluate, info, serve.

Bad arguments are click usage errors (one line, exit code 2); anything vit-explain reports
about models, images or exports is one ``Error:`` line with exit code 1; never a traceback.

One module per command (``export``, ``info``, ``explain``, ``evaluate``, ``serve``), and ``common`` for
what they share; this module only builds the group. The command modules import no numpy,
onnxruntime or torch until a command runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import click

from .. import __version__
from . import evaluate, explain, export, info, serve
from .common import progress_lines


class _Group(click.Group):
    """Ctrl-C in any command: one ``interrupted`` line and exit code 130 (128 + SIGINT, what a
    shell reports), instead of click's ``Aborted!`` with exit code 1."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Each command with the whole first line of its help (click cuts it at ~45 characters)."""
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.short_help or (command.help or "").strip().splitlines()[0]))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            with progress_lines():
                return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vit-explain")
def main() -> None:
    """Where did the Vision Transformer look? Attention Rollout and Gradient Rollout, fast."""


# The commands live in their own modules; the names here stay the modules (vit_explain.cli.explain
# is the module, its command is vit_explain.cli.explain.explain).
main.add_command(export.export)
main.add_command(info.info)
main.add_command(explain.explain)
main.add_command(evaluate.evaluate)
main.add_command(serve.serve)
