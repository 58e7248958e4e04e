"""Draw ``docs/images/swin_vs_vit.jpg``: a Swin map next to a ViT map of the same photos.

Made with the calls the CLI makes (``Explainer.explain``, ``model_box``, ``overlay``). No model
hub is reachable here, so both models carry **random weights** (seed 0): the maps show how each
architecture routes relevance (Swin: a 56x56 first-stage grid through shifted windows and patch
merging; ViT: a 14x14 grid through global attention), not what a trained model looks at.

    vit-explain export swin_tiny_patch4_window7_224 --weights random -o models/swin_t_random.onnx
    vit-explain export deit_tiny_patch16_224 --weights random -o models/deit_t_random.onnx
    python docs/make_swin_figure.py --swin models/swin_t_random.onnx --vit models/deit_t_random.onnx
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_figures import _labelled, _map, _side_by_side_rows  # noqa: E402

from vit_explain.outputs import atomic_write_bytes  # noqa: E402
from vit_explain.runtime import Explainer  # noqa: E402
from vit_explain.runtime.images import load_image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ["both.png", "dogbird.png", "plane.png"]
#: (caption, method, head fusion, discard ratio)
MAPS = [("rollout, max, 0.9", "rollout", "max", 0.9), ("rollout, min, 0.9", "rollout", "min", 0.9)]


def build(vit: Explainer, swin: Explainer, images: Path):
    font = ImageFont.load_default(size=13)
    vit_grid = "x".join(map(str, vit.metadata.grid_size))
    swin_grid = "x".join(map(str, swin.metadata.grid_size))
    rows = []
    for name in PHOTOS:
        photo = load_image(images / name)
        panels = [("image", photo)]
        for caption, method, fusion, discard in MAPS:
            spec = (caption, method, fusion, discard)
            panels.append((f"ViT {vit_grid}: {caption}", _map(vit, photo, spec)))
            panels.append((f"Swin {swin_grid}: {caption}", _map(swin, photo, spec)))
        rows.append(_labelled(panels, font))
    return _side_by_side_rows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--swin", type=Path, default=ROOT / "models" / "swin_t_random.onnx")
    parser.add_argument("--vit", type=Path, default=ROOT / "models" / "deit_t_random.onnx")
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "images")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "images" / "swin_vs_vit.jpg")
    args = parser.parse_args()
    with Explainer(args.vit) as vit, Explainer(args.swin) as swin:
        figure = build(vit, swin, args.images)
    buffer = io.BytesIO()
    figure.save(buffer, "JPEG", quality=85, optimize=True)
    atomic_write_bytes(args.output, buffer.getvalue())
    print(f"wrote {args.output} ({figure.width}x{figure.height})")


if __name__ == "__main__":
    main()
