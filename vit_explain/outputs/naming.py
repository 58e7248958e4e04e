"""Where an image's outputs go: one stem per input, inside the output folder, never clashing.

The promise to users: outputs of different inputs never overwrite each other and never land
outside the output folder, whatever the input file names are (``..``, separators, reserved
Windows names, a symlinked sub-folder). Pure string work plus one ``resolve``: no Pillow.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path, PurePosixPath

__all__ = ["output_stem", "stem_rel"]


# Characters refused on Windows or awkward in shells/URLs; dots are replaced in
# the final stem so that callers can add ".overlay.png"-style suffixes unambiguously.
_UNSAFE = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)}
_MAX_PART = 120  # characters; keeps long names under common 255-byte limits even in UTF-8 + suffixes


def _clean_part(part: str) -> str:
    """Make one path component safe: no separators, no trailing dots/spaces, not reserved."""
    if part.strip("/") in ("", ".", ".."):  # root ("/" or "//") of an absolute rel, or traversal
        return ""
    part = unicodedata.normalize("NFC", part)
    part = _UNSAFE.sub("_", part)[:_MAX_PART].strip().rstrip(". ")
    if part in ("", ".", ".."):
        return ""
    if part.split(".")[0].casefold() in _WINDOWS_RESERVED:
        part = "_" + part
    return part


def stem_rel(rel: PurePosixPath) -> PurePosixPath:
    """The output stem for ``rel`` relative to the output folder (pure, no I/O).

    ``a/cat.png`` -> ``a/cat_png``: the folder is kept (``a`` and ``b`` differ) and
    the extension folded into the name (``cat.png`` and ``cat.jpg`` differ).
    ``..``, root, drive letters and empty components are dropped or neutralised.
    """
    parts = [p for p in (_clean_part(x) for x in rel.parts[:-1]) if p]
    name = rel.name if rel.parts else ""
    stem = name.replace(".", "_")
    stem = _clean_part(stem) or "image"
    return PurePosixPath(*parts, stem)


def output_stem(output_dir: Path, rel: PurePosixPath) -> Path:
    """Where the outputs for one image go: ``output_dir / folders / name_ext``.

    Callers append their own suffix, e.g. ``stem.with_name(stem.name + ".rollout.png")``;
    the stem contains no dot, so such names cannot clash between images. Raises
    ValueError if the result would not be inside ``output_dir`` (e.g. a symlinked
    sub-folder pointing elsewhere), so nothing is ever written outside it.
    """
    output_dir = Path(output_dir)
    result = output_dir / Path(*stem_rel(PurePosixPath(rel)).parts)
    root = output_dir.resolve()
    resolved = result.resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise ValueError(f"refusing to write outside the output folder: {result}")
    return result
