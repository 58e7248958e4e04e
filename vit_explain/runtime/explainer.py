"""The public entry point: images in, masks and predictions out. No torch anywhere."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..metadata import ModelMetadata
from ..graph import FUSED_METHODS
from .images import load_image
from .preprocess import preprocess_batch, preprocess_image
from .rollout import (
    CLASS_SPECIFIC_METHODS,
    HEAD_FUSIONS,
    METHODS,
    attention_masks,
    check_start_layer,
    gae_masks,
    gae_rows_from_fused,
    rollout_masks,
    rollout_rows_from_fused,
    rows_to_masks,
)
from .session import ModelSession

__all__ = [
    "DEFAULT_HEAD_FUSION",
    "DEFAULT_DISCARD_RATIO",
    "USES_HEAD_FUSION",
    "USES_DISCARD_RATIO",
    "USES_START_LAYER",
    "WHY_UNUSED",
    "Explanation",
    "Explainer",
    "softmax",
]

#: The original tool's defaults: max fusion for rollout, mean for gradient rollout, discard 0.9.
#: Raw last-layer attention averages its heads. GAE has no head-fusion choice (it averages the
#: positive part of gradient x attention over the heads) and no discard ratio: ``None``.
DEFAULT_HEAD_FUSION: dict[str, str | None] = {"rollout": "max", "grad_rollout": "mean", "gae": None, "attention": "mean"}
DEFAULT_DISCARD_RATIO = 0.9
#: Methods that take a head fusion, and those that take a discard ratio; others record ``None``.
USES_HEAD_FUSION = ("rollout", "grad_rollout", "attention")
USES_DISCARD_RATIO = ("rollout", "grad_rollout")
#: Why a method refuses a setting it does not use (the Python error and the CLI's say it).
WHY_UNUSED = {
    "gae": "GAE averages the positive part of gradient x attention over the heads and discards nothing",
    "attention": "last-layer attention reads the last layer alone, with nothing discarded",
}
#: Methods that propagate through the layers and so accept ``start_layer``.
USES_START_LAYER = ("rollout", "grad_rollout", "gae")

#: The most images in one part of a split batch. Two parts side by side of 2 images each ran a
#: gradient batch 1-5% faster than of 4 (DeiT-tiny, 2 cores: 8 images 318 vs 336 ms median, 32
#: images 1095 vs 1126 ms), forward-only equal: the parts' working sets (the saved activations, the
#: output maps) then fit the shared cache better, and a pool of more parts than threads evens out
#: the threads' finishing times. One image per part was slower.
PART_IMAGES = 2

ImageInput = str | os.PathLike | Image.Image


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities in float64 (stable: the row maximum is subtracted first)."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class Explanation:
    """Masks for a batch, with the model outputs and the settings that produced them."""

    masks: np.ndarray  # [B, grid_h, grid_w] float32, each scaled to max 1
    logits: np.ndarray  # [B, C] (logits, or output features for a model without a head)
    method: str
    head_fusion: str | None  # None where the method has no head-fusion choice (gae)
    discard_ratio: float | None  # None where the method discards nothing (gae, attention)
    category_index: tuple[int, ...] | None  # per image, class-specific methods (grad_rollout, gae) only
    metadata: ModelMetadata = field(repr=False)
    start_layer: int = 0  # layers left out at the start of the chain (rollout, grad_rollout, gae)

    def top_k(self, k: int = 5) -> list[list[tuple[int, str, float]]]:
        """Per image: (index, name, probability) of the k most likely classes (empty for feature models)."""
        if self.metadata.output_kind != "logits":
            return [[] for _ in range(self.logits.shape[0])]
        probabilities = softmax(self.logits.astype(np.float64))
        k = min(k, probabilities.shape[1])
        result = []
        for row in probabilities:
            order = np.argsort(-row, kind="stable")[:k]
            result.append([(int(i), self.metadata.class_name(int(i)), float(row[i])) for i in order])
        return result

    def settings(self) -> dict:
        return {
            "method": self.method,
            "head_fusion": self.head_fusion,
            "discard_ratio": self.discard_ratio,
            "start_layer": self.start_layer,
        }


def expand_category_index(category_index, batch: int, num_outputs: int, kind: str = "outputs") -> tuple[int, ...] | None:
    """One category per image from ``None``, one int, or one per image; a clear ValueError otherwise."""
    if category_index is None:
        return None
    indices = [category_index] if isinstance(category_index, (int, np.integer)) else list(category_index)
    if len(indices) == 1:
        indices = indices * batch
    if len(indices) != batch:
        raise ValueError(f"got {len(indices)} category indices for {batch} images (give one, or one per image)")
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= int(index) < num_outputs:
            raise ValueError(
                f"category index {index!r} is out of range: the model has {num_outputs} {kind} (0..{num_outputs - 1})"
            )
    return tuple(int(i) for i in indices)


def _chunks(total: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def _slice(categories: tuple[int, ...] | None, part: slice) -> tuple[int, ...] | None:
    return None if categories is None else categories[part]


class Explainer:
    """Explain images with an exported vit-explain model.

    >>> explainer = Explainer("models/deit_tiny_patch16_224.onnx")
    >>> result = explainer.explain(["both.png"], category_index=243)
    >>> result.masks.shape
    (1, 14, 14)

    One onnxruntime session is created here and reused; ``explain`` keeps no state between
    calls and may be called from several threads.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "auto",
        threads: int | None = None,
        graph_batch: int | None = None,
        fuse_in_graph: bool | None = None,
    ) -> None:
        """``graph_batch``: the most images per graph call (default 8 on the CPU, 64 on CUDA).
        Larger batches are explained in chunks: the attention outputs grow with the batch (about
        5.6 MB per image for DeiT-tiny, twice that with gradients) while CPU throughput stops
        growing near 8, so chunks bound the peak memory at no cost in speed.

        On a CPU, a batch of at least one image per thread (``threads``, default every core) is
        split into parts of at most :data:`PART_IMAGES` images, explained side by side on a pool
        of one thread per core, each part on one core from image file to mask: decoding, a
        single-threaded graph call and the maths. One graph call that splits each operator over
        the cores leaves them idle at every operator's end (the small element-wise operators of
        the backward pass hardly split at all); whole images per core do not, and no stage waits
        for the others' slowest image. Parts hold at most ``graph_batch / threads`` images (and
        at least one), so no more than ``graph_batch`` (or ``threads``, if more) are in flight at
        once. Fewer images than threads, a single one included, run in one call over every thread.

        ``fuse_in_graph`` (default: on CUDA only): fuse the heads inside the graph
        (:meth:`ModelSession.run_fused`), so ``heads`` times less data leaves the GPU and the
        numpy maths reads one map per layer. On a CPU it is no faster than fusing in numpy (the
        graph's float64 product and reductions cost what numpy's do), so the raw outputs are used.
        Both give the same masks."""
        self.session = ModelSession(path, device=device, threads=threads)
        self.metadata: ModelMetadata = self.session.metadata
        if graph_batch is None:
            graph_batch = 64 if self.session.uses_cuda else 8
        if graph_batch < 1:
            raise ValueError(f"graph_batch must be at least 1, not {graph_batch}")
        self.graph_batch = graph_batch
        self.fuse_in_graph = self.session.uses_cuda if fuse_in_graph is None else bool(fuse_in_graph)
        # Image decoding and the rollout maths run outside the graph call; a pool as wide as the
        # graph's thread count (8 at most) spreads them over the cores.
        self.workers = max(1, min(8, threads or os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="vit-explain") if self.workers > 1 else None
        self._closed = False

    # -- inputs -------------------------------------------------------------------------
    def preprocess(self, inputs: Sequence[ImageInput] | ImageInput, serial: bool = False) -> np.ndarray:
        """Paths or PIL images -> ``[B, 3, H, W]`` float32, exactly as timm's eval transform.
        ``serial``: on the calling thread only (as each part of a split batch is)."""
        if isinstance(inputs, (str, os.PathLike, Image.Image)):
            inputs = [inputs]
        config = self.metadata.preprocess
        if serial or len(inputs) < 2 or self.workers < 2:
            return preprocess_batch([load_image(item) for item in inputs], config)
        # Decoding and resizing release the GIL: a small pool overlaps them across images.
        return np.stack(list(self._pool.map(lambda item: preprocess_image(load_image(item), config), inputs)))

    def _pixels(self, inputs, serial: bool = False) -> np.ndarray:
        if isinstance(inputs, np.ndarray):
            expected = self.metadata.preprocess.input_size
            if inputs.ndim != 4 or tuple(inputs.shape[1:]) != tuple(expected):
                raise ValueError(
                    f"a preprocessed array must be [B, {expected[0]}, {expected[1]}, {expected[2]}], "
                    f"got {list(inputs.shape)}"
                )
            return np.ascontiguousarray(inputs, dtype=np.float32)
        return self.preprocess(inputs, serial)

    # -- checks ---------------------------------------------------------------------------
    def _categories(self, category_index, batch: int) -> tuple[int, ...] | None:
        kind = "classes" if self.metadata.output_kind == "logits" else "output features"
        return expand_category_index(category_index, batch, self.metadata.num_outputs, kind)

    def resolve_settings(
        self, method: str | None, head_fusion: str | None, discard_ratio: float | None, has_category: bool
    ) -> tuple[str, str | None, float | None]:
        """Defaults as the original tool: a category means gradient rollout.

        A setting the method does not use (head fusion for ``gae``, discard ratio for ``gae`` and
        ``attention``) is refused with the reason, as the CLI refuses the flag: silently dropping
        it would record and report a map computed differently from what the caller asked for.
        """
        method = method or ("grad_rollout" if has_category else "rollout")
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
        unused = [
            name for name, given, users in (
                ("head_fusion", head_fusion is not None, USES_HEAD_FUSION),
                ("discard_ratio", discard_ratio is not None, USES_DISCARD_RATIO),
            ) if given and method not in users
        ]
        if unused:
            raise ValueError(f"{' and '.join(unused)} {'do' if len(unused) > 1 else 'does'} not apply to {method}: {WHY_UNUSED[method]}")
        if method in USES_HEAD_FUSION:
            head_fusion = head_fusion or DEFAULT_HEAD_FUSION[method]
            if head_fusion not in HEAD_FUSIONS:
                raise ValueError(f"head fusion must be one of {', '.join(HEAD_FUSIONS)}, not {head_fusion!r}")
        if method not in USES_DISCARD_RATIO:
            return method, head_fusion, None
        discard_ratio = DEFAULT_DISCARD_RATIO if discard_ratio is None else float(discard_ratio)
        if not 0.0 <= discard_ratio < 1.0:
            raise ValueError(f"discard ratio must be in [0, 1), not {discard_ratio}")
        return method, head_fusion, discard_ratio

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the worker threads: queued work is cancelled, running work is waited for.

        Why: a worker still inside an onnxruntime call when the interpreter exits (after Ctrl-C,
        say) can meet onnxruntime's threads being torn down and abort the process (``terminate
        called without an active exception``, exit 134). Idempotent; ``explain`` after ``close``
        raises RuntimeError."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Explainer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- the job --------------------------------------------------------------------------
    def explain(
        self,
        inputs: Sequence[ImageInput] | ImageInput | np.ndarray,
        method: str | None = None,
        head_fusion: str | None = None,
        discard_ratio: float | None = None,
        category_index: int | Sequence[int] | None = None,
        start_layer: int = 0,
    ) -> Explanation:
        """Masks for ``inputs``: image paths, PIL images, or a preprocessed ``[B, 3, H, W]`` array.

        ``method``: ``rollout``, ``grad_rollout``, ``gae`` or ``attention`` (see
        :mod:`vit_explain.runtime.rollout`). The class-specific methods (``grad_rollout``,
        ``gae``) without a category explain each image's top-1 class (for a model without a
        classifier head: the direction of its own output features). ``start_layer`` leaves the
        first layers out of rollout, gradient rollout and GAE (0 <= start_layer < layers).
        """
        if self._closed:
            raise RuntimeError("this Explainer is closed")
        method, head_fusion, discard_ratio = self.resolve_settings(method, head_fusion, discard_ratio, category_index is not None)
        meta = self.metadata
        if method in USES_START_LAYER:
            start_layer = check_start_layer(start_layer, meta.num_layers)
        elif start_layer != 0:
            raise ValueError(f"start_layer does not apply to {method}: {WHY_UNUSED[method]}")
        if isinstance(inputs, np.ndarray):
            inputs = self._pixels(inputs)  # shape checked before any work
        elif isinstance(inputs, (str, os.PathLike, Image.Image)):
            inputs = [inputs]
        else:
            inputs = list(inputs)
        batch = len(inputs)
        if batch == 0:
            raise ValueError("no images to explain")
        categories = self._categories(category_index, batch)
        settings = (method, head_fusion, discard_ratio, start_layer)

        if self._splits(batch):
            parts = self._parts(batch)
            results = list(self._pool.map(lambda part: self._explain_part(inputs, part, categories, settings), parts))
        else:
            pixels = self._pixels(inputs)
            results = [
                self._explain_chunk(pixels[chunk], _slice(categories, chunk), *settings)
                for chunk in _chunks(batch, self.graph_batch)
            ]
        masks, logits, explained = zip(*results)
        return Explanation(
            np.concatenate(masks), np.concatenate(logits), method, head_fusion, discard_ratio,
            tuple(i for part in explained for i in (part or ())) or None, meta, int(start_layer),
        )

    # -- how a batch is cut ---------------------------------------------------------------
    def _splits(self, batch: int) -> bool:
        """Whether ``batch`` images run as parts side by side, each on one core: on a CPU with
        two threads or more, when there is at least one image per thread (with fewer, parts
        would leave cores idle that one call over every thread uses)."""
        return self._pool is not None and not self.session.uses_cuda and batch >= self.workers

    def _parts(self, batch: int) -> list[slice]:
        """Consecutive parts of about ``batch / workers`` images, but no more than
        :data:`PART_IMAGES`, nor ``graph_batch / workers``; the first part holds half as many.

        Why the short first part: the threads would otherwise start together on equal parts and
        stay in step, decoding at the same moments and doing the maths at the same moments. Those
        stages are many short numpy and Pillow calls that hand Python's GIL back and forth, so
        in step they wait on each other (the maths of a part took 3.5-4.3 ms an image side by
        side against 2.1 ms alone). Half a part of offset puts one thread's decoding and maths
        inside the other's graph call, which holds no GIL: 8 images, rollout, 2 threads, 30
        interleaved calls: 125.7 vs 131.6 ms median; 32 images 529 vs 560 ms; gradient rollout
        8 images 290 vs 295 ms. The pool still ends balanced: the last part takes the rest."""
        size = max(1, min(PART_IMAGES, self.graph_batch // self.workers, math.ceil(batch / self.workers)))
        first = size // 2 if batch > size else 0
        rest = [slice(part.start + first, part.stop + first) for part in _chunks(batch - first, size)]
        return ([slice(0, first)] if first else []) + rest

    def describe_calls(self, batch: int) -> str:
        """How ``batch`` images are run, in words (for benchmark notes and logs)."""
        if self._splits(batch):
            parts = self._parts(batch)
            sizes = sorted({p.stop - p.start for p in parts}, reverse=True)
            return (
                f"{len(parts)} parts of {'/'.join(map(str, sizes))} images, side by side on "
                f"{self.workers} threads, one graph call per part on one thread each"
            )
        chunks = _chunks(batch, self.graph_batch)
        return f"{len(chunks)} graph call(s) of at most {self.graph_batch} images, each on every thread"

    def _explain_part(self, inputs, part: slice, categories, settings):
        """One part of a split batch, from image files to masks, on the calling thread only."""
        pixels = self._pixels(inputs[part], serial=True)
        return self._explain_chunk(pixels, _slice(categories, part), *settings, single_thread=True)

    def graph_calls(self, pixels: np.ndarray, method: str, head_fusion: str | None, class_weights: np.ndarray | None) -> None:
        """Exactly the graph calls :meth:`explain` makes for these images, and nothing else.

        For the benchmark's "graph call alone": the same parts, threads and sessions, on pixels
        preprocessed beforehand and with the class weights given."""

        def call(chunk: slice, single_thread: bool) -> None:
            weights = None if class_weights is None else class_weights[chunk]
            self._call_graph(pixels[chunk], method, head_fusion, weights, single_thread)

        if self._splits(len(pixels)):
            list(self._pool.map(lambda part: call(part, True), self._parts(len(pixels))))
        else:
            for chunk in _chunks(len(pixels), self.graph_batch):
                call(chunk, False)

    def prepare(self, method: str, head_fusion: str | None, batch: int, top1: bool = False) -> None:
        """Create now the sessions :meth:`explain` will use for ``batch`` images (else made on
        first use); ``top1``: for a class-specific method called without a category."""
        self.session.prepare(
            method, head_fusion, fused=self._fuses_in_graph(method), single_thread=self._splits(batch), top1=top1
        )

    def _fuses_in_graph(self, method: str) -> bool:
        return self.fuse_in_graph and method in FUSED_METHODS

    def _call_graph(self, pixels, method, head_fusion, weights, single_thread, top1=False):
        """The one graph call for a chunk or part: ``(logits, fused maps)`` from the fused graph
        when the heads are fused in it, else the raw per-layer outputs (:class:`LayerOutputs`)."""
        if self._fuses_in_graph(method):
            return self.session.run_fused(pixels, method, head_fusion, weights, single_thread, top1)
        return self.session.run_layers(pixels, weights, single_thread, top1)

    def _explain_chunk(self, pixels, categories, method, head_fusion, discard_ratio, start_layer, single_thread=False):
        # Without a category, the graph explains each image's top-1 output itself, in one call.
        top1 = method in CLASS_SPECIFIC_METHODS and categories is None
        weights = self._class_weights(categories) if method in CLASS_SPECIFIC_METHODS and not top1 else None
        outputs = self._call_graph(pixels, method, head_fusion, weights, single_thread, top1)
        if self._fuses_in_graph(method):
            logits, fused = outputs
            masks_for = self._fused_masks(fused, method, discard_ratio, start_layer)
        else:
            logits = outputs.logits
            masks_for = self._raw_masks(outputs, method, head_fusion, discard_ratio, start_layer)
        if top1 and self.metadata.output_kind == "logits":
            categories = tuple(int(i) for i in logits.argmax(axis=1))  # the graph's choice: the first maximum
        batch = pixels.shape[0]
        if single_thread or batch < 2 or self.workers < 2:
            return masks_for(slice(None)), logits, categories
        # Each image's maths is independent and numpy releases the GIL in it: split the batch.
        bounds = np.linspace(0, batch, min(self.workers, batch) + 1).astype(int)
        parts = self._pool.map(masks_for, [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])])
        return np.concatenate(list(parts)), logits, categories

    def _raw_masks(self, outputs, method, head_fusion, discard_ratio, start_layer):
        """Masks for a slice of the batch, from the graph's raw per-head outputs."""
        layout = (self.metadata.num_prefix_tokens, self.metadata.grid_size, self.metadata.has_class_token)

        def masks_for(items: slice) -> np.ndarray:
            attentions = [layer[items] for layer in outputs.attentions]
            gradients = None if outputs.gradients is None else [layer[items] for layer in outputs.gradients]
            if method == "gae":
                return gae_masks(attentions, gradients, *layout, start_layer)
            if method == "attention":
                return attention_masks(attentions, head_fusion, *layout)
            return rollout_masks(attentions, gradients, head_fusion, discard_ratio, *layout, start_layer)

        return masks_for

    def _fused_masks(self, fused, method, discard_ratio, start_layer):
        """Masks for a slice of the batch, from maps the graph already fused per layer."""
        meta = self.metadata

        def masks_for(items: slice) -> np.ndarray:
            if method == "gae":
                rows = gae_rows_from_fused(fused[:, items], meta.num_prefix_tokens, meta.has_class_token, start_layer)
            else:
                rows = rollout_rows_from_fused(
                    fused[:, items], discard_ratio, meta.num_prefix_tokens, meta.has_class_token, start_layer
                )
            return rows_to_masks(rows, meta.grid_size)

        return masks_for

    def _class_weights(self, categories: tuple[int, ...]) -> np.ndarray:
        """One-hot ``[B, outputs]`` float32 weights for the categories (one per image)."""
        weights = np.zeros((len(categories), self.metadata.num_outputs), dtype=np.float32)
        weights[np.arange(len(categories)), list(categories)] = 1.0
        return weights
