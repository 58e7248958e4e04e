"""On a CPU, a batch runs as parts side by side, each on one thread from image file to mask.

The split must change nothing but speed: the same masks, logits and explained classes as one
graph call over every thread (to float32 noise: the two sessions run the same graph on
different batch sizes), in input order, with bad inputs refused as before.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vit_explain.errors import ImageError
from vit_explain.runtime import Explainer

METHODS = [("rollout", "max", None), ("grad_rollout", "mean", [3, 1, 4, 1, 5]), ("grad_rollout", "mean", None),
           ("gae", None, 7), ("attention", "mean", None)]


@pytest.fixture(scope="module")
def deit(export_family):
    return export_family("deit")


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Five small photos of different sizes and modes, as files."""
    folder = tmp_path_factory.mktemp("split-images")
    rng = np.random.default_rng(4)
    paths = []
    for index, (size, mode) in enumerate([((64, 48), "RGB"), ((40, 70), "L"), ((50, 50), "RGBA"),
                                          ((90, 30), "RGB"), ((33, 33), "RGB")]):
        pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
        path = folder / f"image{index}.png"
        Image.fromarray(pixels, "RGBA").convert(mode).save(path)
        paths.append(str(path))
    return paths


def test_split_batches_give_the_masks_of_one_call(deit, image_files):
    split = Explainer(deit.path, device="cpu", threads=2, graph_batch=4)  # 5 images: parts of 2, 2, 1
    whole = Explainer(deit.path, device="cpu", threads=1)
    assert "3 parts of 2/1 images" in split.describe_calls(5)
    assert "1 graph call(s)" in whole.describe_calls(5)
    inputs = [image_files[0], Image.open(image_files[1]), *image_files[2:]]
    for method, fusion, category in METHODS:
        a = split.explain(inputs, method=method, head_fusion=fusion, category_index=category)
        b = whole.explain(inputs, method=method, head_fusion=fusion, category_index=category)
        assert a.masks.shape == (5, *deit.metadata.grid_size) and a.masks.max() > 0
        np.testing.assert_allclose(a.masks, b.masks, rtol=0, atol=1e-5, err_msg=method)
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-5)
        assert a.category_index == b.category_index
    # The split ran on single-threaded sessions; the whole batch on the shared one.
    assert {single for _, single in split.session._sessions} == {True}
    assert {single for _, single in whole.session._sessions} == {False}


def test_one_image_uses_every_thread_in_one_call(deit, image_files):
    explainer = Explainer(deit.path, device="cpu", threads=2)
    result = explainer.explain(image_files[0])
    assert result.masks.shape[0] == 1
    assert {single for _, single in explainer.session._sessions} == {False}


def test_fewer_images_than_threads_run_in_one_call(deit, image_files):
    """Parts of one image each would leave cores idle that one call over every thread uses."""
    explainer = Explainer(deit.path, device="cpu", threads=4)
    explainer.explain(image_files[:3])
    assert {single for _, single in explainer.session._sessions} == {False}
    assert "1 graph call(s)" in explainer.describe_calls(3) and "4 parts of 1" in explainer.describe_calls(4)


def test_parts_hold_at_most_two_images(deit):
    """PART_IMAGES: 8 images on 2 threads run as parts of 2 (not 2 of 4), the first and last of 1;
    a small graph_batch still bounds the images in flight."""
    explainer = Explainer(deit.path, device="cpu", threads=2)
    assert "5 parts of 2/1 images" in explainer.describe_calls(8)
    assert "17 parts of 2/1 images" in explainer.describe_calls(32)
    assert "3 parts of 2/1 images" in explainer.describe_calls(5)
    assert "8 parts of 1 images" in Explainer(deit.path, device="cpu", threads=2, graph_batch=2).describe_calls(8)


@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize("batch", range(1, 40))
def test_parts_cover_the_batch_in_order_with_a_short_first_part(deit, threads, batch):
    """The first part holds half a part (so the threads' decoding and maths fall out of step),
    the others a full part but the last; in order, every image once; and on a pool that hands
    each free thread the next part, the busiest thread has no more images than with equal parts."""
    explainer = Explainer(deit.path, device="cpu", threads=threads)
    parts = explainer.scheduler.parts(batch)
    assert [i for part in parts for i in range(part.start, part.stop)] == list(range(batch))
    sizes = [part.stop - part.start for part in parts]
    size = max(sizes)
    assert size <= 2 and min(sizes) >= 1
    if batch > size > 1:
        assert sizes[0] == size // 2 and set(sizes[1:-1]) <= {size}

    def busiest(part_sizes):  # each part to the thread that frees up first (ties: lowest thread)
        loads = [0] * threads
        for part_size in part_sizes:
            loads[loads.index(min(loads))] += part_size
        return max(loads)

    equal = [min(size, batch - start) for start in range(0, batch, size)]
    assert busiest(sizes) <= busiest(equal)


def test_parts_keep_the_input_order(deit, image_files):
    explainer = Explainer(deit.path, device="cpu", threads=2, graph_batch=2)  # parts of one image
    together = explainer.explain(image_files, method="rollout").masks
    for index, path in enumerate(image_files):
        np.testing.assert_allclose(together[index], explainer.explain([path], method="rollout").masks[0], atol=1e-5)


def test_a_bad_image_in_a_split_batch_is_reported(deit, image_files, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    explainer = Explainer(deit.path, device="cpu", threads=2)
    with pytest.raises(ImageError, match="broken.png"):
        explainer.explain([*image_files[:3], str(broken)])
    with pytest.raises(ValueError, match="no images"):
        explainer.explain([])
