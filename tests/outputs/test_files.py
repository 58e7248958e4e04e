"""Atomic writes (vit_explain.atomic), input discovery (vit_explain.discovery), output naming (vit_explain.outputs.naming)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from vit_explain import atomic
from vit_explain.atomic import atomic_write_bytes, atomic_writer, save_json, save_npy, save_png
from vit_explain.discovery import InputImage, discover_images, looks_like_image, sniff_image
from vit_explain.outputs.naming import output_stem


def _leftovers(folder: Path) -> list[str]:
    """Temp files the atomic writer would leave behind if it failed to clean up."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _jpeg(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path, format="JPEG")
    return path


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (0, 0, 255)).save(path, format="PNG")
    return path


def _text(path: Path, content: str = "not an image\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


# =========================================================================== atomic writes


def test_atomic_write_bytes_writes_and_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert _leftovers(tmp_path) == []


def test_atomic_writer_creates_missing_parents(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c.txt"
    with atomic_writer(target, "w") as f:
        f.write("héllo")
    assert target.read_text(encoding="utf-8") == "héllo"


def test_atomic_writer_temp_file_is_hidden_in_same_folder(tmp_path: Path) -> None:
    target = tmp_path / "x.png"
    with atomic_writer(target) as f:
        tmp = Path(f.name)
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".x.png.") and tmp.name.endswith(".tmp")
        assert not target.exists(), "nothing at the final path before the write completes"
    assert not tmp.exists()


def test_atomic_writer_failure_mid_write_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "keep.txt"
    target.write_text("old complete content")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_writer(target, "w") as f:
            f.write("new half")
            raise RuntimeError("boom")
    assert target.read_text() == "old complete content"
    assert _leftovers(tmp_path) == []


def test_atomic_writer_failure_leaves_no_final_file(tmp_path: Path) -> None:
    target = tmp_path / "new.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_writer(target) as f:
            f.write(b"partial")
            raise KeyboardInterrupt
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_atomic_writer_replace_failure_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    target = tmp_path / "r.bin"
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_bytes(target, b"data")
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_atomic_writer_rejects_other_modes(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        with atomic_writer(tmp_path / "x", "a"):
            pass


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_atomic_writer_gives_normal_permissions(tmp_path: Path) -> None:
    """Temp files are created 0600; finished outputs must be readable like any file."""
    target = tmp_path / "perm.bin"
    atomic_write_bytes(target, b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_json_accepts_numpy_values(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    save_json(
        target,
        {"p": np.float32(0.5), "i": np.int64(3), "a": np.arange(3), "b": np.bool_(True), "path": Path("x/y")},
    )
    text = target.read_text(encoding="utf-8")
    assert json.loads(text) == {"p": 0.5, "i": 3, "a": [0, 1, 2], "b": True, "path": "x/y"}
    assert "\n  " in text, "indented for humans"


def test_save_json_failure_inside_default_leaves_nothing(tmp_path: Path) -> None:
    class Exploding:
        """Serialising this raises in the middle of json.dump."""

    target = tmp_path / "r.json"
    with pytest.raises(TypeError, match="Exploding"):
        save_json(target, {"first": list(range(1000)), "bad": Exploding()})
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_save_json_failure_keeps_previous_version(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    save_json(target, {"ok": 1})
    with pytest.raises(TypeError):
        save_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert _leftovers(tmp_path) == []


def test_save_png_and_npy_round_trip(tmp_path: Path) -> None:
    image = Image.new("RGB", (5, 3), (1, 2, 3))
    save_png(tmp_path / "sub" / "i.png", image)
    with Image.open(tmp_path / "sub" / "i.png") as back:
        assert back.format == "PNG" and back.size == (5, 3)
        assert back.getpixel((0, 0)) == (1, 2, 3)

    mask = np.random.default_rng(0).random((14, 14), dtype=np.float32)
    save_npy(tmp_path / "m.npy", mask)
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), mask)
    assert not (tmp_path / "m.npy.npy").exists()
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "sub") == []


# =========================================================================== discovery


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A photo folder with nested images, disguised images and non-images; cwd = tmp_path."""
    root = tmp_path / "photos"
    _jpeg(root / "b.jpg")
    _png(root / "a.png")
    _jpeg(root / "sub" / "deep" / "c.jpeg")
    _jpeg(root / "photo.dat")  # JPEG content, odd extension: found by content
    _text(root / "notes.png")  # text with a photo's name: taken, so that loading it says what is wrong
    _text(root / "readme.txt")
    _jpeg(root / ".hidden.jpg")  # hidden files are skipped
    _jpeg(root / ".git" / "x.jpg")
    monkeypatch.chdir(tmp_path)
    return root


#: What discovery takes from ``tree``: a.png, b.jpg, notes.png (by name), photo.dat (by content), c.jpeg.
TREE_IMAGES = 5


def _rels(images: list[InputImage]) -> list[str]:
    return [str(i.rel) for i in images]


def test_photo_names_are_taken_whatever_their_content(tmp_path: Path) -> None:
    """A corrupt JPEG or a HEIC Pillow cannot read, among the photos, must fail loudly when it is
    loaded, not vanish from the run: discovery takes it by its name."""
    for name in ("broken.jpg", "IMG_0001.HEIC", "scan.TIFF", "x.avif"):
        (tmp_path / name).write_bytes(b"\xff\xd8\xff\xe0 not really")
        assert not sniff_image(tmp_path / name)
        assert looks_like_image(tmp_path / name)
    for name in ("notes.txt", "data.bin", "paper.pdf"):
        _text(tmp_path / name)
        assert not looks_like_image(tmp_path / name)
    _jpeg(tmp_path / "photo.dat")
    assert looks_like_image(tmp_path / "photo.dat")


def test_sniff_image_by_content(tree: Path) -> None:
    assert sniff_image(tree / "photo.dat")
    assert not sniff_image(tree / "notes.png")
    assert not sniff_image(tree / "missing.png")


def test_folder_is_walked_recursively_sorted_by_name_or_content(tree: Path) -> None:
    images, problems = discover_images(["photos"])
    assert problems == []
    assert _rels(images) == [
        "photos/a.png", "photos/b.jpg", "photos/notes.png", "photos/photo.dat", "photos/sub/deep/c.jpeg"
    ]
    assert images[0].path == Path("photos/a.png")
    assert all(i.path.is_file() for i in images)


def test_discovery_is_deterministic(tree: Path) -> None:
    assert discover_images(["photos"]) == discover_images(["photos"])


def test_explicit_files_are_always_included(tree: Path) -> None:
    images, problems = discover_images(["photos/readme.txt", "photos/b.jpg"])
    assert problems == []
    assert _rels(images) == ["readme.txt", "b.jpg"]


def test_missing_inputs_are_problems(tree: Path) -> None:
    images, problems = discover_images(["nope.jpg", "photos/b.jpg", "no_dir/"])
    assert _rels(images) == ["b.jpg"]
    assert [p[0] for p in problems] == ["nope.jpg", "no_dir/"]
    assert all("no such" in reason for _, reason in problems)


def test_empty_folder_and_empty_string_are_problems(tree: Path) -> None:
    (tree.parent / "empty").mkdir()
    images, problems = discover_images(["empty", ""])
    assert images == []
    assert [p[0] for p in problems] == ["empty", ""]


def test_glob_recursive_relative_to_non_magic_prefix(tree: Path) -> None:
    images, problems = discover_images(["photos/**/*.jp*g"])
    assert problems == []
    assert _rels(images) == ["b.jpg", "sub/deep/c.jpeg"]


def test_glob_filters_by_name_or_content(tree: Path) -> None:
    images, _ = discover_images(["photos/*"])
    assert _rels(images) == ["a.png", "b.jpg", "notes.png", "photo.dat", "sub/deep/c.jpeg"]  # not readme.txt


def test_glob_matching_nothing_is_a_problem(tree: Path) -> None:
    images, problems = discover_images(["photos/*.webp"])
    assert images == []
    assert problems == [("photos/*.webp", "no files match this pattern")]


def test_glob_matching_only_non_images_is_a_problem(tree: Path) -> None:
    images, problems = discover_images(["photos/*.txt"])
    assert images == [] and len(problems) == 1 and "no images" in problems[0][1]


def test_glob_matching_a_folder_walks_it(tree: Path) -> None:
    images, _ = discover_images(["photos/su*"])
    assert _rels(images) == ["sub/deep/c.jpeg"]


def test_existing_path_with_magic_characters_is_literal(tree: Path) -> None:
    weird = _jpeg(tree.parent / "shot[1].jpg")
    images, problems = discover_images(["shot[1].jpg"])
    assert problems == [] and [i.path for i in images] == [Path(weird.name)]


def test_same_file_given_twice_is_deduplicated(tree: Path) -> None:
    images, _ = discover_images(["photos/b.jpg", "./photos/b.jpg", str(tree / "b.jpg"), "photos"])
    paths = [i.path.resolve() for i in images]
    assert len(paths) == len(set(paths))
    assert paths.count((tree / "b.jpg").resolve()) == 1
    assert len(images) == TREE_IMAGES


def test_clashing_names_get_unique_rels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """a/cat.png and b/cat.png given as files would both be called cat.png."""
    monkeypatch.chdir(tmp_path)
    _png(tmp_path / "a" / "cat.png")
    _png(tmp_path / "b" / "cat.png")
    _png(tmp_path / "c" / "CAT.png")
    images, _ = discover_images(["a/cat.png", "b/cat.png", "c/CAT.png"])
    rels = _rels(images)
    assert rels[0] == "cat.png"
    stems = {str(output_stem(tmp_path / "out", i.rel)).casefold() for i in images}
    assert len(stems) == 3, rels


def test_custom_is_image_predicate_is_used(tree: Path) -> None:
    seen: list[Path] = []

    def only_jpg_names(path: Path) -> bool:
        seen.append(path)
        return path.suffix == ".jpg"

    images, _ = discover_images(["photos"], is_image=only_jpg_names)
    assert _rels(images) == ["photos/b.jpg"]
    assert Path("photos/notes.png") in seen


def test_exclude_skips_output_folder(tree: Path) -> None:
    _png(tree / "out" / "a_png.overlay.png")
    images, _ = discover_images(["photos"], exclude=[tree / "out"])
    assert not any("out" in i.rel.parts for i in images)
    assert len(images) == TREE_IMAGES


def test_dot_folder_uses_its_real_name(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree / "sub")
    images, _ = discover_images(["."])
    assert _rels(images) == ["sub/deep/c.jpeg"]


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks")
def test_symlink_loop_does_not_hang(tree: Path) -> None:
    (tree / "sub" / "loop").symlink_to(tree, target_is_directory=True)
    images, _ = discover_images(["photos"])
    assert len(images) == TREE_IMAGES


# =========================================================================== output naming


def _inside(out: Path, p: Path) -> bool:
    return p.resolve().is_relative_to(out.resolve()) and p.resolve() != out.resolve()


def test_output_stem_keeps_folder_and_extension(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert output_stem(out, PurePosixPath("a/cat.png")) == out / "a" / "cat_png"


def test_same_name_in_different_folders_do_not_collide(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert output_stem(out, PurePosixPath("a/cat.png")) != output_stem(out, PurePosixPath("b/cat.png"))


def test_same_stem_different_extension_do_not_collide(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert output_stem(out, PurePosixPath("cat.png")) != output_stem(out, PurePosixPath("cat.jpg"))


def test_stem_has_no_dot_so_suffixes_cannot_clash(tmp_path: Path) -> None:
    stem = output_stem(tmp_path, PurePosixPath("my.photo.v2.JPG"))
    assert "." not in stem.name


@pytest.mark.parametrize(
    "rel",
    [
        "../../etc/passwd",
        "a/../../../x.png",
        "..",
        "../",
        "/etc/passwd",
        "//server/share/x.png",
        "C:/Windows/x.png",
        "C:x.png",
        "..\\..\\x.png",
        "a/./b/../c.png",
        "",
        ".",
        "...",
        "a/ /b/.png",
    ],
)
def test_output_stem_never_escapes(tmp_path: Path, rel: str) -> None:
    out = tmp_path / "out"
    stem = output_stem(out, PurePosixPath(rel))
    assert _inside(out, stem), stem
    assert ".." not in stem.relative_to(out).parts
    assert stem.name  # never empty


def test_output_stem_drive_letter_is_neutralised(tmp_path: Path) -> None:
    stem = output_stem(tmp_path, PurePosixPath("C:/x.png"))
    assert ":" not in str(stem.relative_to(tmp_path))


def test_output_stem_empty_name_gets_placeholder(tmp_path: Path) -> None:
    assert output_stem(tmp_path, PurePosixPath("")).name == "image"
    assert output_stem(tmp_path, PurePosixPath("a/...")).name  # dots-only name


def test_output_stem_windows_reserved_and_long_names(tmp_path: Path) -> None:
    assert output_stem(tmp_path, PurePosixPath("con")).name.casefold() != "con"
    long = output_stem(tmp_path, PurePosixPath("x" * 400 + ".png"))
    assert len(long.name.encode()) < 200


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks")
def test_output_stem_refuses_symlink_out_of_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "a").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match="outside"):
        output_stem(out, PurePosixPath("a/cat.png"))
