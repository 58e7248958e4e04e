"""``--engine ray``: Ray Data and a pool of actors write the same shards as the local engine.

One local Ray (4 logical CPUs: fewer can deadlock Ray Data's stages; a small object store; no
dashboard) for the module, shut down at its end. Skipped cleanly without Ray (the ``[ray]`` extra).
"""

from __future__ import annotations

import faulthandler
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.helpers.paths import REPO_ROOT
from tests.helpers.photos import make_photos
from vit_explain.cli import main

pq = pytest.importorskip("pyarrow.parquet")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

#: The most this module may take (~1 min on a loaded 2-core machine).
RAY_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def local_ray():
    """Ray for this module; its workers import this checkout (PYTHONPATH), as the tests do."""
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), previous]))
    ray.init(num_cpus=4, object_store_memory=100 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    # Bounded: a Ray Data deadlock would hang the whole run; this ends it with the stacks instead.
    faulthandler.dump_traceback_later(RAY_TIMEOUT_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        ray.shutdown()
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous


def cli(*args):
    return CliRunner().invoke(main, ["explain", *map(str, args)])


def _rows(out: Path) -> dict[str, list[dict]]:
    return {p.name: pq.read_table(p).to_pylist() for p in sorted(out.glob("shard-*.parquet"))}


def test_ray_engine_writes_the_local_engines_shards_and_resumes(tmp_path, export_family, local_ray):
    model = export_family("deit").path
    folder = tmp_path / "photos"
    good, broken = make_photos(folder, 16)
    common = (folder, "--model", model, "--output-format", "parquet", "--shard-size", "4", "--batch-size", "2",
              "--category-index", "3", "--category-index", "7")
    local = cli(*common, "-o", tmp_path / "local")
    assert local.exit_code == 1, local.output  # the broken files

    out = tmp_path / "ray"
    out.mkdir()
    shutil.copy(tmp_path / "local" / "shard-00001.parquet", out)  # a complete shard from a killed run: skipped
    result = cli(*common, "-o", out, "--engine", "ray", "--actors", "2")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    in_copied = sum(1 for row in pq.read_table(out / "shard-00001.parquet").to_pylist() if row["error"])
    assert f"{12 - len(broken) + in_copied} done, 4 skipped, {len(broken) - in_copied} failed" in result.stderr, result.stderr
    assert (out / "shard-00001.parquet").read_bytes() == (tmp_path / "local" / "shard-00001.parquet").read_bytes()

    expected, got = _rows(tmp_path / "local"), _rows(out)
    assert got.keys() == expected.keys() == {f"shard-{i:05d}.parquet" for i in range(4)}
    for name in expected:
        assert pq.read_schema(out / name).metadata == pq.read_schema(tmp_path / "local" / name).metadata  # same stamp
        assert len(got[name]) == len(expected[name])
        for mine, theirs in zip(got[name], expected[name], strict=True):
            # masks and probabilities to 1e-5 (another batch split: float32 summation order); the rest exactly
            same = {key: value for key, value in mine.items() if key not in ("mask", "top_k")}
            assert same == {key: value for key, value in theirs.items() if key not in ("mask", "top_k")}
            if theirs["mask"] is None:
                assert mine["mask"] is None and mine["error"]
                continue
            np.testing.assert_allclose(np.frombuffer(mine["mask"], "<f4"), np.frombuffer(theirs["mask"], "<f4"), atol=1e-5, rtol=0)
            assert [p["index"] for p in mine["top_k"]] == [p["index"] for p in theirs["top_k"]]
            np.testing.assert_allclose([p["probability"] for p in mine["top_k"]], [p["probability"] for p in theirs["top_k"]],
                                       atol=1e-5)
    errors = [row["error"] for rows in got.values() for row in rows if row["error"]]
    assert len(errors) == len(set(errors)) == len(broken)  # one error row per broken image, two map rows per good one
    assert sum(len(rows) for rows in got.values()) == 2 * len(good) + len(broken)

    again = cli(*common, "-o", out, "--engine", "ray", "--actors", "2")
    assert again.exit_code == 0 and "0 done, 16 skipped, 0 failed" in again.stderr, again.output
