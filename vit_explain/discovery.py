"""Finding the input images: files, folders (recursive) and glob patterns, each file once.

It lives apart from :mod:`vit_explain.outputs` because it is about inputs; it uses the output
naming only to give clashing inputs (``a/cat.png`` twice via two patterns, ``Cat.png`` beside
``cat.png`` on a case-insensitive disk) names whose outputs cannot overwrite each other.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from .atomic import PathLike
from .outputs.naming import stem_rel

__all__ = ["InputImage", "PHOTO_SUFFIXES", "discover_images", "looks_like_image", "sniff_image"]



@dataclass(frozen=True)
class InputImage:
    """One image to explain.

    ``path`` is where to read it; ``rel`` is a relative name used only to name its
    outputs (see :func:`output_stem`), unique among one :func:`discover_images` call.
    """

    path: Path
    rel: PurePosixPath


def sniff_image(path: Path) -> bool:
    """True when Pillow recognises the file's content as an image.

    Only the header is read, so this is cheap. Decompression bombs count as images:
    the loader then refuses them with a clear message instead of silently skipping.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path):
                return True
    except Image.DecompressionBombError:
        return True
    except Exception:  # noqa: BLE001 - any failure to parse means "not an image"
        return False


#: Extensions that name a photo. A file found in a folder with one of these is taken even when
#: Pillow does not recognise its content, so that a corrupt JPEG or an iPhone's HEIC among the
#: photos is reported with the reason when it is loaded, not silently left out.
PHOTO_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".heic", ".heif", ".avif",
     ".jxl", ".jp2"}
)


def looks_like_image(path: Path) -> bool:
    """A photo's name (:data:`PHOTO_SUFFIXES`), or content Pillow recognises (:func:`sniff_image`):
    what folder and pattern discovery takes by default. ``photo.dat`` holding a JPEG is taken;
    ``readme.txt`` is not; a ``broken.jpg`` is taken and then reported as failed."""
    return path.suffix.lower() in PHOTO_SUFFIXES or sniff_image(path)


def _walk_files(folder: Path) -> Iterator[Path]:
    """All files under ``folder``, recursively, in a deterministic sorted order.

    Hidden entries (``.git``, ``.DS_Store``, our own ``.*.tmp`` files) are skipped,
    and symlinked folders are not followed, so a link loop cannot hang discovery.
    """
    for root, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(root) / name


def _glob_base(pattern: str) -> Path:
    """The leading part of ``pattern`` without wildcards, e.g. ``data`` for ``data/**/*.jpg``."""
    parts = Path(pattern).parts
    base: list[str] = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        base.append(part)
    return Path(*base) if base else Path(".")


def _rel_posix(path: Path, start: Path) -> PurePosixPath:
    """``path`` relative to ``start`` as a POSIX path (no ``..`` as both are absolute)."""
    return PurePosixPath(*path.absolute().relative_to(start.absolute()).parts)


def _folder_label(folder: Path) -> str:
    """The name a folder's outputs are grouped under (``.`` becomes the cwd's name)."""
    return folder.resolve().name or "root"


@dataclass
class _Collector:
    """Accumulates discovered images, dropping duplicates and renaming clashing names."""

    is_image: Callable[[Path], bool]
    excluded: tuple[Path, ...]
    images: list[InputImage]
    seen_files: set[Path]
    seen_keys: set[str]

    def add(self, path: Path, rel: PurePosixPath, *, check_content: bool) -> bool:
        """Add one file; returns True when it is (or already was) an accepted image."""
        resolved = path.resolve()
        if resolved in self.seen_files:
            return True
        if check_content and (self._is_excluded(resolved) or not self.is_image(path)):
            return False
        self.seen_files.add(resolved)
        self.images.append(InputImage(path=path, rel=self._unique(rel)))
        return True

    def _is_excluded(self, resolved: Path) -> bool:
        return any(resolved.is_relative_to(ex) for ex in self.excluded)

    def _unique(self, rel: PurePosixPath) -> PurePosixPath:
        """Rename ``rel`` (``cat-2.png``, ...) until its outputs clash with no other's.

        Keys are compared case-insensitively because macOS and Windows folders are.
        """
        candidate, n = rel, 1
        while (key := str(stem_rel(candidate)).casefold()) in self.seen_keys:
            n += 1
            candidate = rel.with_name(f"{rel.stem}-{n}{rel.suffix}")
        self.seen_keys.add(key)
        return candidate


def _add_folder(col: _Collector, folder: Path, label: PurePosixPath) -> int:
    """Add the images under ``folder``; ``label`` prefixes their ``rel``. Returns the count."""
    found = 0
    for file in _walk_files(folder):
        found += col.add(file, label / _rel_posix(file, folder), check_content=True)
    return found


def _add_glob(col: _Collector, pattern: str) -> str | None:
    """Add the images a glob pattern matches; returns a problem description or None."""
    matches = sorted(glob.glob(pattern, recursive=True))
    if not matches:
        return "no files match this pattern"
    base = _glob_base(pattern)
    found = 0
    for match in map(Path, matches):
        if match.is_dir():
            found += _add_folder(col, match, _rel_posix(match, base))
        elif match.is_file():
            found += col.add(match, _rel_posix(match, base), check_content=True)
    return None if found else f"{len(matches)} match(es) but no images among them"


def _add_input(col: _Collector, item: str) -> str | None:
    """Add one user input (file, folder or pattern); returns a problem or None."""
    if not item.strip():
        return "empty path"
    path = Path(item)
    if path.is_file():  # explicit files always go in: the loader explains failures
        col.add(path, PurePosixPath(path.name or "image"), check_content=False)
        return None
    if path.is_dir():
        if _add_folder(col, path, PurePosixPath(_folder_label(path))) == 0:
            return "no images found in this folder"
        return None
    if os.path.lexists(item):
        return "not a regular file or folder"
    if glob.has_magic(item):
        return _add_glob(col, item)
    return "no such file or folder"


def discover_images(
    inputs: Sequence[str],
    is_image: Callable[[Path], bool] = looks_like_image,
    exclude: Iterable[PathLike] = (),
) -> tuple[list[InputImage], list[tuple[str, str]]]:
    """Expand files, folders (recursive) and glob patterns into a list of images.

    Files named explicitly are always included; files found in folders or by
    patterns only when ``is_image`` accepts them: by default a photo's extension or image
    content (:func:`looks_like_image`: ``photo.dat`` holding a JPEG is found, ``readme.txt`` is
    not, and a corrupt ``broken.jpg`` is found, so that loading it says what is wrong).
    An existing path is taken literally even if it contains ``*`` or ``[``.
    ``exclude`` lists folders to skip while walking (pass the output folder, so a
    second run does not explain the previous run's overlays).

    Returns ``(images, problems)``: images in input order then sorted path order,
    each file once, with unique ``rel`` names; problems as ``(input, reason)``.
    """
    col = _Collector(
        is_image=is_image,
        excluded=tuple(Path(e).resolve() for e in exclude),
        images=[],
        seen_files=set(),
        seen_keys=set(),
    )
    problems: list[tuple[str, str]] = []
    for item in inputs:
        problem = _add_input(col, item)
        if problem is not None:
            problems.append((item, problem))
    return col.images, problems
