"""Regenerate the README's map figure, ``docs/images/dinov2_maps.jpg``.

The picture must show what the tool really draws, so it is made with the same calls the CLI
makes (``Explainer.explain``, ``model_box``, ``overlay``) on the real DINOv2 ViT-S/14 backbone:

    vit-explain export vit_small_patch14_dinov2 --num-classes 0 --img-size 224 \\
        --weights ../shared/models/vit_small_patch14_dinov2.imgfocus.safetensors -o models/dinov2_s14.onnx
    python docs/make_figures.py --model models/dinov2_s14.onnx

Rows 1-3: the square example photos under three maps. Rows 4-5: non-square photos made from
them, where the model (crop_pct 1.0: resize the short side to 224, centre-crop) sees only a
centred square: the overlay colours that window and greys out the rest. The last row puts
three photos side by side; the model sees the middle one only, and its map there is that
photo's own map, shown on the right.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from vit_explain.outputs import atomic_write_bytes, model_box, overlay
from vit_explain.runtime import Explainer
from vit_explain.runtime.images import load_image

ROOT = Path(__file__).resolve().parents[1]
#: (label, method, head fusion, discard ratio): the README's three maps.
MAPS = [
    ("rollout, max, 0.9", "rollout", "max", 0.9),
    ("rollout, min, 0.9", "rollout", "min", 0.9),
    ("grad_rollout, mean, 0.9", "grad_rollout", "mean", 0.9),
]
SQUARE = ["both.png", "dogbird.png", "plane.png"]
CELL, LABEL_H = 224, 20


def _side_by_side(images: list[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)))
    x = 0
    for image in images:
        out.paste(image, (x, 0))
        x += image.width
    return out


def _map(explainer: Explainer, image: Image.Image, spec: tuple[str, str, str, float]) -> Image.Image:
    """One overlay, exactly as ``vit-explain explain`` writes it."""
    _, method, fusion, discard = spec
    mask = explainer.explain([image], method=method, head_fusion=fusion, discard_ratio=discard).masks[0]
    return overlay(image, mask, "jet", 0.5, model_box(image.size, explainer.metadata))


def _labelled(panels: list[tuple[str, Image.Image]], font: ImageFont.ImageFont) -> Image.Image:
    """A row of panels, each with its caption in a white strip above it."""
    row = Image.new("RGB", (sum(p.width for _, p in panels), LABEL_H + max(p.height for _, p in panels)), "white")
    draw, x = ImageDraw.Draw(row), 0
    for caption, panel in panels:
        draw.text((x + 4, 3), caption, fill="black", font=font)
        row.paste(panel, (x, LABEL_H))
        x += panel.width
    return row


def build(explainer: Explainer, images: Path) -> Image.Image:
    font = ImageFont.load_default(size=13)
    photos = {name: load_image(images / name) for name in SQUARE}
    rows = []
    for name in SQUARE:
        photo = photos[name]
        rows.append(_labelled([("image", photo)] + [(s[0], _map(explainer, photo, s)) for s in MAPS], font))
    pair = _side_by_side([photos["both.png"], photos["dogbird.png"]])
    rows.append(_labelled([(f"448x224: {s[0]}", _map(explainer, pair, s)) for s in MAPS[1:]], font))
    triple = _side_by_side([photos["plane.png"], photos["dogbird.png"], photos["both.png"]])
    grad = MAPS[2]
    rows.append(_labelled([
        (f"672x224: {grad[0]}", _map(explainer, triple, grad)),
        ("middle photo alone", _map(explainer, photos["dogbird.png"], grad)),
    ], font))
    return _side_by_side_rows(rows)


def _side_by_side_rows(rows: list[Image.Image]) -> Image.Image:
    width = max(r.width for r in rows)
    out = Image.new("RGB", (width, sum(r.height for r in rows)), "white")
    y = 0
    for row in rows:
        out.paste(row, (0, y))
        y += row.height
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "dinov2_s14.onnx")
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "images")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "images" / "dinov2_maps.jpg")
    args = parser.parse_args()
    figure = build(Explainer(args.model), args.images)
    buffer = io.BytesIO()
    figure.save(buffer, "JPEG", quality=85, optimize=True)
    atomic_write_bytes(args.output, buffer.getvalue())
    print(f"wrote {args.output} ({figure.width}x{figure.height})")


if __name__ == "__main__":
    main()
