"""The public entry point: images in, masks and predictions out. No torch anywhere.

The Explainer is the thin line through the parts: inputs (:mod:`.inputs`) -> settings and the
method's record (:mod:`vit_explain.methods`) -> the scheduler's pieces (:mod:`.scheduler`) ->
one graph call each (:mod:`.session`) -> the method's maths. It holds no method's rules itself:
whatever differs between methods is read from the record.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..metadata import ModelMetadata
from ..methods import Method, Settings, get_method, resolve_settings
from ..methods.chain import LayerMaps, TokenLayout, rows_to_masks
from .device_path import DevicePath
from .inputs import ImageInput, as_batch, class_weights, expand_category_index, preprocess
from .prefetch import Prefetcher
from .scheduler import Scheduler, chunks
from .session import ModelSession

__all__ = ["Explanation", "Explainer", "choose_device_path", "softmax"]

logger = logging.getLogger(__name__)


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


def choose_device_path(session: ModelSession, wanted: bool | None) -> DevicePath | None:
    """The in-graph path when wanted (default: on CUDA) and the model's layout allows it."""
    if not (session.uses_cuda if wanted is None else wanted):
        return None
    if session.method_graph_declines:
        logger.info("the method runs in numpy for this model: %s", session.method_graph_declines)
        return None
    return DevicePath(session)


class Explainer:
    """Explain images with an exported vit-explain model.

    >>> explainer = Explainer("models/deit_tiny_patch16_224.onnx")
    >>> result = explainer.explain(["both.png"], category_index=243)
    >>> result.masks.shape
    (1, 14, 14)

    One onnxruntime session is created here and reused; ``explain`` keeps no state between
    calls and may be called from several threads. ``close()`` (or ``with Explainer(...)``)
    stops its worker threads.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "auto",
        threads: int | None = None,
        graph_batch: int | None = None,
        fuse_in_graph: bool | None = None,
        method_in_graph: bool | None = None,
    ) -> None:
        """``graph_batch``: the most images per graph call (default 8 on the CPU, 64 on CUDA).
        Larger batches are explained in chunks: the attention outputs grow with the batch (about
        5.6 MB per image for DeiT-tiny, twice that with gradients) while CPU throughput stops
        growing near 8, so chunks bound the peak memory at no cost in speed.

        On a CPU, a batch of at least one image per thread (``threads``, default every core) is
        split into parts of at most :data:`~.scheduler.PART_IMAGES` images, explained side by
        side on a pool of one thread per core, each part on one core from image file to mask:
        decoding, a single-threaded graph call and the maths. One graph call that splits each
        operator over the cores leaves them idle at every operator's end (the small element-wise
        operators of the backward pass hardly split at all); whole images per core do not, and
        no stage waits for the others' slowest image. Parts hold at most ``graph_batch /
        threads`` images (and at least one), so no more than ``graph_batch`` (or ``threads``, if
        more) are in flight at once. Fewer images than threads, a single one included, run in
        one call over every thread.

        ``fuse_in_graph`` (default: on CUDA only): fuse the heads inside the graph
        (:meth:`ModelSession.run_fused`), so ``heads`` times less data leaves the GPU and the
        numpy maths reads one map per layer. On a CPU it is no faster than fusing in numpy (the
        graph's float64 product and reductions cost what numpy's do), so the raw outputs are used.
        Both give the same masks.

        ``method_in_graph`` (default: on CUDA only): the whole method runs inside the graph
        (:mod:`.device_path`), so only logits and masks leave the device. On a CPU the numpy
        path stays the default: measured no faster there (docs/gpu.md). A model whose
        layout the in-graph maths does not know runs the numpy path, with a log line."""
        self.session = ModelSession(path, device=device, threads=threads)
        self.metadata: ModelMetadata = self.session.metadata
        if graph_batch is None:
            graph_batch = 64 if self.session.uses_cuda else 8
        # Image decoding and the maths run outside the graph call; a pool as wide as the
        # graph's thread count (8 at most) spreads them over the cores.
        workers = max(1, min(8, threads or os.cpu_count() or 1))
        self.scheduler = Scheduler(workers, graph_batch, self.session.uses_cuda)
        self.fuse_in_graph = self.session.uses_cuda if fuse_in_graph is None else bool(fuse_in_graph)
        # A windowed model (Swin) has per-block maps of different shapes: no graph fusion, and
        # its layout (stages, windows, shifts) goes to the methods' windowed maths.
        self.windowed = self.metadata.windows is not None
        self.fuse_in_graph = self.fuse_in_graph and not self.windowed
        self.layout = self.session.window_layout or TokenLayout(
            self.metadata.num_prefix_tokens, self.metadata.has_class_token, self.metadata.seed_weights
        )
        self.device_path = choose_device_path(self.session, method_in_graph)
        self.prefetcher = Prefetcher()

    @property
    def workers(self) -> int:
        return self.scheduler.workers

    @property
    def graph_batch(self) -> int:
        return self.scheduler.graph_batch

    def preprocess(self, inputs: Sequence[ImageInput] | ImageInput, serial: bool = False) -> np.ndarray:
        """Paths or PIL images -> ``[B, 3, H, W]`` float32, exactly as timm's eval transform.
        ``serial``: on the calling thread only (as each part of a split batch is)."""
        return preprocess(inputs, self.metadata, None if serial else self.scheduler.pool_map)

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the worker threads (see :meth:`Scheduler.close`); ``explain`` after it raises
        RuntimeError. Idempotent."""
        self.scheduler.close()
        self.prefetcher.close()

    def __enter__(self) -> Explainer:
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

        ``method``: one of :data:`vit_explain.methods.METHOD_NAMES` (``rollout``,
        ``grad_rollout``, ``gae``, ``attention``); settings are defaulted and checked by
        :func:`vit_explain.methods.resolve_settings`. The class-specific methods without a
        category explain each image's top-1 class (for a model without a classifier head: the
        direction of its own output features). ``start_layer`` leaves the first layers out of
        the methods that propagate through them (0 <= start_layer < layers).
        """
        if self.scheduler.closed:
            raise RuntimeError("this Explainer is closed")
        meta = self.metadata
        settings = resolve_settings(
            method, head_fusion, discard_ratio, start_layer,
            has_category=category_index is not None, num_layers=meta.num_layers,
        )
        inputs = as_batch(inputs, meta)  # an array's shape is checked before any work
        batch = len(inputs)
        if batch == 0:
            raise ValueError("no images to explain")
        kind = "classes" if meta.output_kind == "logits" else "output features"
        categories = expand_category_index(category_index, batch, meta.num_outputs, kind)

        def piece(images: slice, single_thread: bool):
            pixels = inputs[images] if isinstance(inputs, np.ndarray) else self.preprocess(inputs[images], single_thread)
            chosen = None if categories is None else categories[images]
            return self._explain_pixels(pixels, chosen, settings, single_thread)

        if self._pipelines(inputs, batch):  # decoding of chunk k+1 overlaps the graph call of chunk k
            results = self.prefetcher.run(
                chunks(batch, self.graph_batch), lambda images: self.preprocess(inputs[images]),
                lambda images, pixels: self._explain_pixels(
                    pixels, None if categories is None else categories[images], settings, False
                ),
            )
        else:
            results = self.scheduler.run(batch, piece)
        masks, logits, explained = zip(*results, strict=True)
        return Explanation(
            np.concatenate(masks), np.concatenate(logits), settings.method, settings.head_fusion,
            settings.discard_ratio, tuple(i for part in explained for i in (part or ())) or None, meta,
            settings.start_layer,
        )

    def _pipelines(self, inputs, batch: int) -> bool:
        """Whether the batch runs as chunks with the next chunk's images decoded during the
        current chunk's graph call (:mod:`.prefetch`): images to decode, more than one chunk, run
        in turn (not as parts side by side), and a pool to decode on."""
        return (
            not isinstance(inputs, np.ndarray) and batch > self.graph_batch
            and not self.scheduler.splits(batch) and self.scheduler.pool_map is not None
        )

    def _explain_pixels(self, pixels: np.ndarray, categories: tuple[int, ...] | None, settings: Settings, single_thread: bool):
        """One chunk or part: one graph call, then the method's maths per image slice."""
        record = settings.record
        # Without a category, the graph explains each image's top-1 output itself, in one call.
        top1 = record.class_specific and categories is None
        weights = class_weights(categories, self.metadata.num_outputs) if record.class_specific and not top1 else None
        if self.device_path is not None:  # the method in the graph: masks come out of the call
            logits, masks = self.device_path.run(pixels, settings, weights, single_thread, top1)
            if top1 and self.metadata.output_kind == "logits":
                categories = tuple(int(i) for i in logits.argmax(axis=1))
            return masks, logits, categories
        outputs = self._call_graph(pixels, record, settings.head_fusion, weights, single_thread, top1)
        if self._fuses_in_graph(record):
            logits, fused = outputs
            maps_of = lambda items: LayerMaps(fused=fused[:, items])  # noqa: E731
        else:
            logits, attentions, gradients = outputs.logits, outputs.attentions, outputs.gradients
            maps_of = lambda items: LayerMaps(  # noqa: E731
                [layer[items] for layer in attentions], None if gradients is None else [layer[items] for layer in gradients]
            )
        if top1 and self.metadata.output_kind == "logits":
            categories = tuple(int(i) for i in logits.argmax(axis=1))  # the graph's choice: the first maximum
        relevance, grid = record.relevance_for(self.windowed), self.metadata.grid_size

        def masks_for(items: slice) -> np.ndarray:
            return rows_to_masks(relevance(maps_of(items), settings, self.layout), grid)

        return self.scheduler.spread(pixels.shape[0], masks_for, single_thread), logits, categories

    # -- the graph calls ------------------------------------------------------------------
    def _fuses_in_graph(self, record: Method) -> bool:
        return self.fuse_in_graph and record.fusable_in_graph

    def _call_graph(self, pixels, record: Method, head_fusion, weights, single_thread, top1=False):
        """The one graph call for a chunk or part: ``(logits, fused maps)`` from the fused graph
        when the heads are fused in it, else the raw per-layer outputs (:class:`LayerOutputs`)."""
        if self._fuses_in_graph(record):
            return self.session.run_fused(pixels, record.name, head_fusion, weights, single_thread, top1)
        return self.session.run_layers(pixels, weights, single_thread, top1)

    def describe_calls(self, batch: int) -> str:
        """How ``batch`` images are run, in words (for benchmark notes and logs)."""
        return self.scheduler.describe(batch)

    def graph_calls(self, pixels: np.ndarray, method: str, head_fusion: str | None, class_weights: np.ndarray | None) -> None:
        """Exactly the graph calls :meth:`explain` makes for these images, and nothing else.

        For the benchmark's "graph call alone": the same parts, threads and sessions, on pixels
        preprocessed beforehand and with the class weights given."""
        record = get_method(method)

        def call(images: slice, single_thread: bool) -> None:
            weights = None if class_weights is None else class_weights[images]
            if self.device_path is not None:  # the method is part of the graph call here
                settings = resolve_settings(method, head_fusion, has_category=weights is not None)
                self.device_path.run(pixels[images], settings, weights, single_thread, top1=weights is None)
                return
            self._call_graph(pixels[images], record, head_fusion, weights, single_thread)

        self.scheduler.run(len(pixels), call)

    def prepare(self, method: str, head_fusion: str | None, batch: int, top1: bool = False) -> None:
        """Create now the sessions :meth:`explain` will use for ``batch`` images (else made on
        first use); ``top1``: for a class-specific method called without a category."""
        if self.device_path is not None:
            self.device_path.prepare(method, head_fusion, self.scheduler.splits(batch), top1)
            return
        self.session.prepare(
            method, head_fusion, fused=self._fuses_in_graph(get_method(method)),
            single_thread=self.scheduler.splits(batch), top1=top1,
        )
