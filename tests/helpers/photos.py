"""A folder of photos for dataset runs: real ones from ``../shared/images`` when present (cut and
scaled into many different photos), synthesised otherwise, plus files that cannot be explained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers.paths import SHARED

#: Files in a dataset folder that must fail alone, and the reason their row gives.
BROKEN = {
    "broken-text.jpg": "not an image",
    "broken-empty.png": "the file is empty",
    "broken-truncated.jpg": "truncated",
}


def _sources() -> list[Image.Image]:
    shared = sorted((SHARED / "images").glob("*.png")) if (SHARED / "images").is_dir() else []
    if shared:
        return [Image.open(path).convert("RGB") for path in shared]
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((320, 240), Image.Resampling.BILINEAR)
            for _ in range(5)]


def make_photos(folder: Path, count: int = 40) -> tuple[list[Path], list[Path]]:
    """``count`` files in ``folder`` (sub-folders too): good photos of varied sizes and formats,
    and the :data:`BROKEN` ones. Returns ``(good, broken)``."""
    sources = _sources()
    good: list[Path] = []
    for i in range(count - len(BROKEN)):
        source = sources[i % len(sources)]
        width, height = source.size
        left, top = (i * 7) % max(1, width // 4), (i * 5) % max(1, height // 4)
        crop = source.crop((left, top, left + width * 3 // 4, top + height * 3 // 4))
        crop = crop.resize((96 + (i % 5) * 24, 80 + (i % 3) * 32), Image.Resampling.BILINEAR)
        path = folder / ("sub" if i % 4 == 0 else ".") / f"photo{i:02d}.{'jpg' if i % 2 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        crop.save(path)
        good.append(path)
    broken = []
    for name in BROKEN:
        path = folder / name
        if "text" in name:
            path.write_text("not a photo\n")
        elif "empty" in name:
            path.write_bytes(b"")
        else:
            data = good[1].read_bytes()
            path.write_bytes(data[: len(data) // 3])
        broken.append(path)
    return good, broken
