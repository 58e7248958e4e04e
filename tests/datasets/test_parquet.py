"""``explain --output-format parquet`` with the local engine, as a user with a big folder meets it.

Forty photos (cut from ``../shared/images`` when present) with three broken files among them, a
depth-3 DeiT exported once per session (the ``deit`` family). What is checked: one row per
(image, map) with the documented columns, the same masks, crop windows and predictions as the
files path writes for the same photos, broken files failing alone with their reason, shards
that survive a SIGKILL and a rerun that resumes with every image exactly once, manifests, and
the rerun rule for a changed setting.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import vit_explain
from tests.helpers.photos import BROKEN, make_photos
from vit_explain.cli import main

pq = pytest.importorskip("pyarrow.parquet")
pd = pytest.importorskip("pandas")

PACKAGE_ROOT = Path(vit_explain.__file__).resolve().parents[1]
SUMMARY = re.compile(r"(\d+) done, (\d+) skipped, (\d+) failed")
COLUMNS = ["path", "image_size", "crop_window", "method", "head_fusion", "discard_ratio", "start_layer", "model_sha256",
           "map", "category_index", "category_name", "top_k", "mask", "mask_shape", "overlay", "error"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, list[Path], list[Path]]:
    folder = tmp_path_factory.mktemp("dataset") / "photos"
    good, broken = make_photos(folder, 40)
    return folder, good, broken


@pytest.fixture(scope="module")
def model(export_family) -> Path:
    return export_family("deit").path


def cli(*args):
    return CliRunner().invoke(main, ["explain", *map(str, args)])


def summary(text: str) -> tuple[int, int, int]:
    found = SUMMARY.findall(text)
    assert len(found) == 1, text
    return tuple(int(n) for n in found[0])


def mask_of(row) -> np.ndarray:
    return np.frombuffer(row["mask"], "<f4").reshape(row["mask_shape"])


def shard_files(out: Path) -> list[Path]:
    return sorted(out.glob("shard-*.parquet"))


def test_rows_match_the_files_path_and_broken_files_fail_alone(tmp_path, photos, model):
    folder, good, broken = photos
    out = tmp_path / "out"
    result = cli(folder, "--model", model, "-o", out, "--output-format", "parquet", "--shard-size", "8", "--batch-size", "4")
    assert result.exit_code == 1, result.output  # three broken files: exit 1, as the files path
    assert summary(result.stderr) == (len(good), 0, len(broken))
    assert "Traceback" not in result.output
    assert [p.name for p in shard_files(out)] == [f"shard-{i:05d}.parquet" for i in range(5)]

    table = pd.read_parquet(out)  # the folder as one dataset: pandas alone, no Ray
    assert list(table.columns) == COLUMNS
    given = sorted(str(p) for p in [*good, *broken])
    assert list(table["path"]) == given  # sorted, one row per image (rollout: one map), none twice
    failed = table[table["error"].notna()]
    assert len(failed) == len(broken)
    for _, row in failed.iterrows():
        reason = BROKEN[Path(row["path"]).name]
        assert row["path"] in row["error"] and reason in row["error"], row["error"]
        assert row["mask"] is None and row["method"] == "rollout"

    # the files path on the same photos: the same masks, crop windows and predictions
    files_out = tmp_path / "files"
    assert cli(folder, "--model", model, "-o", files_out, "--format", "npy", "--format", "json").exit_code == 1
    done = table[table["error"].isna()]
    assert len(done) == len(good)
    for _, row in done.iterrows():
        rel = Path(row["path"]).relative_to(folder)
        stem = files_out / folder.name / rel.parent / rel.name.replace(".", "_")
        record = json.loads(stem.with_name(stem.name + ".rollout.json").read_text())
        np.testing.assert_allclose(mask_of(row), np.load(stem.with_name(stem.name + ".rollout.npy")), atol=1e-6, rtol=0)
        assert mask_of(row).shape == (14, 14) and mask_of(row).max() == pytest.approx(1.0)
        assert list(row["image_size"]) == record["image_size"]
        assert list(row["crop_window"]) == record["crop_window"]
        assert [p["index"] for p in row["top_k"]] == [p["index"] for p in record["predictions"]]
        np.testing.assert_allclose([p["probability"] for p in row["top_k"]],
                                   [p["probability"] for p in record["predictions"]], atol=2e-6)
        assert row["model_sha256"] == record["settings"]["model_sha256"]
        assert (row["head_fusion"], row["discard_ratio"], row["start_layer"]) == ("max", 0.9, 0)
        assert row["map"] == "rollout" and pd.isna(row["category_index"]) and pd.isna(row["overlay"])

    # a rerun with the same settings skips every shard and rewrites nothing
    mtimes = {p: p.stat().st_mtime_ns for p in shard_files(out)}
    again = cli(folder, "--model", model, "-o", out, "--output-format", "parquet", "--shard-size", "8")
    assert summary(again.stderr) == (0, len(good) + len(broken), 0) and again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in shard_files(out)} == mtimes


def test_class_maps_overlays_and_a_changed_setting(tmp_path, photos, model):
    folder, good, _ = photos
    subset = tmp_path / "subset"
    subset.mkdir()
    for path in good[:6]:
        (subset / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "out"
    args = (subset, "--model", model, "-o", out, "--output-format", "parquet", "--shard-size", "4",
            "--category-index", "3", "--category-index", "7", "--overlays")
    result = cli(*args)
    assert result.exit_code == 0, result.output
    table = pq.read_table(out).to_pandas()
    assert len(table) == 12  # one row per (image, map), maps in the order asked for
    assert list(table["category_index"]) == [3, 7] * 6
    assert list(table["map"]) == ["grad_rollout.3", "grad_rollout.7"] * 6
    assert set(table["method"]) == {"grad_rollout"} and set(table["head_fusion"]) == {"mean"}
    for _, row in table.iterrows():
        overlay = out / row["overlay"]
        assert overlay.is_file() and row["overlay"].startswith("_overlays/") and row["overlay"].endswith(f".{row['map']}.png")
    assert len(list((out / "_overlays").rglob("*.png"))) == 12

    stamps = [json.loads(pq.read_schema(p).metadata[b"vit_explain"]) for p in shard_files(out)]
    assert {s["settings"]["head_fusion"] for s in stamps} == {"mean"}
    # another head fusion: every shard redone, as the files path redoes its images
    changed = cli(*args, "--head-fusion", "min")
    assert summary(changed.stderr) == (6, 0, 0), changed.output
    assert set(pq.read_table(out).column("head_fusion").to_pylist()) == {"min"}
    # a smaller plan would leave shard-00001 behind: refused with one line, then replaced on --overwrite
    smaller = cli(*args, "--head-fusion", "min", "--shard-size", "10")
    assert smaller.exit_code == 1 and "shard-00001.parquet beyond this run's 1 shard(s)" in smaller.output, smaller.output
    assert "Traceback" not in smaller.output
    replaced = cli(*args, "--head-fusion", "min", "--shard-size", "10", "--overwrite")
    assert replaced.exit_code == 0 and [p.name for p in shard_files(out)] == ["shard-00000.parquet"], replaced.output
    assert len(pq.read_table(out)) == 12


def test_manifests_text_csv_parquet_and_uris(tmp_path, photos, model):
    folder, good, _ = photos
    data = tmp_path / "data"
    data.mkdir()
    for path in good[:3]:
        (data / path.name).write_bytes(path.read_bytes())
    names = sorted(p.name for p in data.iterdir())
    (data / "list.txt").write_text(f"# photos\n{names[0]}\n\n{names[1]}\n{names[1]}\nmissing.jpg\n{(data / names[2]).as_uri()}\n")
    (data / "list.csv").write_text("label,path\n" + "".join(f"x,{name}\n" for name in names) + "y,missing.jpg\n")
    pq.write_table(pq.read_table(_as_parquet(tmp_path, [*names, "missing.jpg"])), data / "list.parquet")
    tables = {}
    for manifest in ("list.txt", "list.csv", "list.parquet"):
        out = tmp_path / f"out-{manifest}"
        result = cli("--manifest", data / manifest, "--model", model, "-o", out, "--output-format", "parquet")
        assert result.exit_code == 1 and summary(result.stderr) == (3, 0, 1), result.output
        table = pd.read_parquet(out)
        tables[manifest] = table
        missing = table[table["path"] == "missing.jpg"]
        assert len(missing) == 1 and "no such file" in missing["error"].iloc[0]
        assert table["error"].isna().sum() == 3 and table["path"].is_unique
    # the path column holds the paths as given: relative names, and the file:// URI
    assert sorted(tables["list.txt"]["path"]) == sorted([names[0], names[1], "missing.jpg", (data / names[2]).as_uri()])
    assert sorted(tables["list.csv"]["path"]) == sorted(tables["list.parquet"]["path"]) == sorted([*names, "missing.jpg"])
    masks = lambda table: {Path(p).name: m for p, m in zip(table["path"], table["mask"], strict=True) if m is not None}  # noqa: E731
    assert masks(tables["list.txt"]).keys() == masks(tables["list.csv"]).keys()
    for name, mask in masks(tables["list.txt"]).items():
        assert np.array_equal(np.frombuffer(mask, "<f4"), np.frombuffer(masks(tables["list.csv"])[name], "<f4"))

    # a folder given as a URI (pyarrow's filesystems: file:// here, s3:// or gs:// alike) is listed by photo extension
    by_uri = cli(data.as_uri(), "--model", model, "-o", tmp_path / "uri", "--output-format", "parquet")
    assert by_uri.exit_code == 0 and summary(by_uri.stderr) == (3, 0, 0), by_uri.output
    assert sorted(pd.read_parquet(tmp_path / "uri")["path"]) == sorted((data / name).as_uri() for name in names)

    # the files path takes a manifest too; a manifest naming nothing is one line
    files = cli("--manifest", data / "list.csv", "--model", model, "-o", tmp_path / "files")
    assert summary(files.stderr) == (3, 0, 1), files.output
    (data / "empty.txt").write_text("# nothing\n")
    empty = cli("--manifest", data / "empty.txt", "--model", model, "--output-format", "parquet", "-o", tmp_path / "e")
    assert empty.exit_code == 1 and "lists no images" in empty.output and "Traceback" not in empty.output


def _as_parquet(tmp_path: Path, names: list[str]) -> Path:
    import pyarrow as pa

    path = tmp_path / "tmp-manifest.parquet"
    pq.write_table(pa.table({"path": names, "label": list(range(len(names)))}), path)
    return path


def test_flags_that_do_not_go_together_are_usage_errors(tmp_path, photos, monkeypatch):
    folder = photos[0]
    for args, words in [
        (("--engine", "ray"), "--engine ray goes with --output-format parquet"),
        (("--overlays",), "--overlays goes with --output-format parquet"),
        (("--shard-size", "5"), "--shard-size goes with --output-format parquet"),
        (("--output-format", "parquet", "--report"), "--report goes with --output-format files"),
        (("--output-format", "parquet", "--actors", "2"), "--actors and --ray-address go with --engine ray"),
    ]:
        result = cli(folder, "-o", tmp_path / "o", *args)
        assert result.exit_code == 2 and words in result.output, result.output
    assert "give images" in cli("-o", tmp_path / "o").output
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    missing = cli(folder, "-o", tmp_path / "o", "--output-format", "parquet")
    assert missing.exit_code == 1 and "pip install 'vit-explain[parquet]'" in missing.output, missing.output
    assert not (tmp_path / "o").exists()
    monkeypatch.delitem(sys.modules, "pyarrow.parquet")
    monkeypatch.setitem(sys.modules, "ray.data", None)  # as if Ray were not installed
    no_ray = cli(folder, "-o", tmp_path / "o", "--output-format", "parquet", "--engine", "ray")
    assert no_ray.exit_code == 1 and "--engine ray needs ray: pip install 'vit-explain[ray]'" in no_ray.output, no_ray.output


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])))


def test_sigkill_mid_run_then_resume_every_image_exactly_once(tmp_path, photos, model):
    folder, good, broken = photos
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vit_explain.cli", "explain", str(folder), "--model", str(model), "-o", str(out),
               "--output-format", "parquet", "--shard-size", "4", "--batch-size", "2", "--threads", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and len(shard_files(out)) < 3:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    stderr = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {stderr}"
    complete = shard_files(out)
    assert 3 <= len(complete) < 10
    before = {p: p.stat().st_mtime_ns for p in complete}
    killed_rows = sum(pq.read_metadata(p).num_rows for p in complete)  # every renamed shard is whole

    rerun = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
    done, skipped, failed = summary(rerun.stderr)
    assert rerun.returncode == (1 if failed else 0), rerun.stderr
    failed_before = sum(1 for p in complete for error in pq.read_table(p).column("error").to_pylist() if error)
    assert skipped == killed_rows and done + skipped + failed == len(good) + len(broken)
    assert failed == len(broken) - failed_before  # failures recorded in a complete shard are not retried
    if failed_before:
        assert f"({failed_before} failed: their rows say why)" in rerun.stderr
    assert {p: p.stat().st_mtime_ns for p in complete} == before  # complete shards not rewritten
    table = pd.read_parquet(out)  # a temp file the kill left behind is hidden: not read as data
    assert sorted(table["path"]) == sorted(str(p) for p in [*good, *broken])  # every image exactly once
    assert table["error"].notna().sum() == len(broken)
    assert [p.name for p in shard_files(out)] == [f"shard-{i:05d}.parquet" for i in range(10)]
