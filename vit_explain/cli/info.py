"""``vit-explain info``: what an exported model is, read from its metadata (no inference)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import VitExplainError
from .common import fail


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def info(model: Path) -> None:
    """Print what an exported model is: source, input size, preprocessing, token layout, classes."""
    from ..model_store import check_not_checkpoint
    from ..runtime.session import ModelSession

    try:
        check_not_checkpoint(model)
        session = ModelSession(model, device="cpu")
    except VitExplainError as exc:
        raise fail(exc) from None
    meta = session.metadata
    for key, value in meta.describe().items():
        click.echo(f"{key:>15}: {value}")
    if meta.class_names:
        shown = ", ".join(meta.class_names[:5]) + (", ..." if len(meta.class_names) > 5 else "")
        click.echo(f"{'class names':>15}: {shown} ({len(meta.class_names)})")
    click.echo(f"{'file':>15}: {model} ({model.stat().st_size / 1e6:.1f} MB)")
    # What people compare with a published hash (sha256sum): changes with any byte of the file.
    click.echo(f"{'file sha256':>15}: {_file_sha256(model)}")


def _file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
