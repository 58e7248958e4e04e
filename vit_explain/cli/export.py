"""``vit-explain export``: a timm, transformers or torchvision model to a checked ONNX file.

The exporter (torch, timm) is imported when the command runs, so the rest of the CLI works,
and ``--help`` stays fast, without them.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import VitExplainError
from .common import fail, showing_export_steps


def _img_size(_ctx, _param, value: str | None) -> tuple[int, int] | None:
    from ..metadata import parse_img_size

    try:
        return parse_img_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
@click.argument("model_name")
@click.option("--weights", default="pretrained", show_default=True,
              help="'pretrained' (timm's or the Hub's, needs network or a cache; a folder's own weights;"
                   " torchvision: also DEFAULT), 'random' (seeded test model) or a local .safetensors/.pth state dict.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --weights random.")
@click.option("--img-size", callback=_img_size, metavar="N|HxW", help="Input size, e.g. 384 or 224x320 (height x width).")
@click.option("--num-classes", type=click.IntRange(min=0),
              help="Classifier size for a fine-tuned checkpoint (0: no head, explain features).")
@click.option("--class-names", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Text file, one class name per line.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the model [default: models/MODEL_NAME.onnx, with _HxW for --img-size"
                   " and _random<seed> or _<checkpoint name> for --weights].")
@click.option("--opset", type=click.IntRange(18, 23), default=20, show_default=True, help="ONNX opset.")
def export(model_name, weights, seed, img_size, num_classes, class_names, output, opset) -> None:
    """Export a Vision Transformer to a checked vit-explain ONNX model.

    MODEL_NAME: a timm model name, a folder written by transformers' save_pretrained (with its
    config.json), hf:ORG/NAME (a transformers model on the Hub) or torchvision:vit_b_16."""
    try:
        from ..export import ModelSpec, default_output_path, export_model
    except ImportError as exc:
        raise fail(VitExplainError(f'export needs PyTorch and timm ({exc.name} is missing): pip install -e ".[export]"')) from None
    from ..families import family_of_source

    try:
        family = family_of_source(model_name)
    except VitExplainError as exc:
        raise fail(exc) from None
    if family == "torchvision" and weights == "DEFAULT":
        weights = "pretrained"  # torchvision's name for its default pretrained weights
    if weights not in ("pretrained", "random") and not Path(weights).is_file():
        raise click.BadParameter(f"{weights!r} is neither 'pretrained', 'random' nor an existing file", param_hint="--weights")
    spec = ModelSpec(model_name, weights=weights, seed=seed, img_size=img_size, num_classes=num_classes, family=family)
    output = output or default_output_path(spec)
    try:
        with showing_export_steps():
            result = export_model(spec, output, class_names_file=class_names, opset=opset)
    except VitExplainError as exc:
        raise fail(exc) from None
    click.echo(str(result.path))

