"""Side-by-side benchmark: the PyTorch reference pipeline vs this runtime vs the bare ONNX graph.

Three pipelines, timed end to end on the same image files, batch sizes and thread count:

``reference``
    what a user would write with PyTorch: Pillow load + timm's eval transform
    (``create_transform(**resolve_model_data_config(model))``) + :class:`~vit_explain.reference.
    TorchReference` ``.masks`` (hooks, ``backward``, full ``N x N`` rollout in float64);
``runtime``
    ``Explainer(onnx_path, threads=threads).explain(paths, method=..., category_index=...)``;
``graph``
    ``explainer.graph_calls(pixels, ...)``: the very onnxruntime calls ``explain`` makes (same
    parts of the batch, threads and sessions) and nothing else, on pixels preprocessed
    beforehand, so ``1 - graph / runtime`` is the share of the runtime's latency spent outside
    onnxruntime.

Fairness
    Every (pipeline, method, batch size) runs in its own fresh Python subprocess
    (``python -m benchmarks.harness.worker``), so each one's peak RSS is its own and the
    runtime processes never import torch. All workers load up front (in parallel); then the
    three of one case are driven in lockstep, round robin (one call each, rotating the order,
    with a pause between calls, :data:`PAUSE_S`, so no thread pool is still spinning when the
    next process starts), so that load from anything else on the machine drifts over all three
    alike. Thread counts are pinned in each worker (``torch.set_num_threads``, onnxruntime
    ``intra_op_num_threads``, and the OpenMP/BLAS environment variables, which also bound
    numpy's matmul threads). Each call's
    process CPU time is recorded beside its latency: on a busy machine it is the steadier
    number (PyTorch's OpenMP pool suffers far more from oversubscription than onnxruntime's).

Memory is reported twice per pipeline: the total peak RSS of the process (``VmHWM``; see
:func:`_peak_rss_bytes` for why not ``ru_maxrss``), and the increment over the RSS measured
after imports and model/session load (the "working" memory of the work itself). On CUDA the
numbers are host RSS only.

Gradient rollout explains a different class per image (:func:`categories_for`).

Nothing here imports torch at module level; the reference worker imports it when it starts.
"""


from .driver import run_benchmark
from .results import PAUSE_S, PIPELINES, BenchRow, PipelineStats, categories_for, format_table, machine_info

__all__ = ["PIPELINES", "PAUSE_S", "BenchRow", "PipelineStats", "categories_for", "run_benchmark", "format_table", "machine_info"]
