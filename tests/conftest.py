"""Shared fixtures: small random timm Vision Transformers, exported once per test session.

Exporting is the slow part of the suite (~9 s for a depth-2 model on a 2-core machine), so the
models are tiny (depth 2-3, small images) and every family is exported at most once per session,
lazily: a test run that selects only one family pays for one export.

Random initialisation makes timm's attention almost uniform (every probability ~1/N). Uniform
attention hides maths bugs: a wrong row normalisation, a reversed layer order or a gradient paired
with the wrong layer all give nearly the same mask when every matrix is ~``J/N``. So before export
each model is made "testable": biases, class/register tokens, layer-scale factors and relative
position tables get non-trivial values (timm initialises many of them to zero or ~1e-6, which also
creates exact ties between tokens), and the query/key projections are scaled up so attention is
peaky. ``test_parity.py`` asserts that the result really is far from uniform.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:  # torch and timm are imported lazily: the runtime tests must run without them
    import torch
    from torch import nn


# --------------------------------------------------------------------------- #
# Making random models testable
# --------------------------------------------------------------------------- #


def _query_key_projections(attention: nn.Module) -> list[tuple[torch.Tensor, slice]]:
    """(tensor, rows) pairs holding the query and key projections of one attention module.

    timm stores them three ways: a fused ``qkv`` Linear whose first ``2 * dim`` output rows are
    q and k (ViT, DeiT, BEiT, EVA), optionally with separate ``q_bias`` (BEiT, EVA: the key has
    no bias), or separate ``q_proj`` / ``k_proj`` Linears (EVA with ``qkv_fused=False``).
    """
    import torch
    from torch import nn

    found: list[tuple[torch.Tensor, slice]] = []
    qkv = getattr(attention, "qkv", None)
    if isinstance(qkv, nn.Linear):
        rows = slice(0, 2 * (qkv.out_features // 3))
        found.append((qkv.weight, rows))
        if qkv.bias is not None:
            found.append((qkv.bias, rows))
    for name in ("q_proj", "k_proj"):
        projection = getattr(attention, name, None)
        if isinstance(projection, nn.Linear):
            found.append((projection.weight, slice(None)))
            if projection.bias is not None:
                found.append((projection.bias, slice(None)))
    q_bias = getattr(attention, "q_bias", None)
    if isinstance(q_bias, torch.Tensor):
        found.append((q_bias, slice(None)))
    if not found:
        raise TypeError(f"no query/key projection found on {type(attention).__name__}")
    return found


def sharpen_attention(model: nn.Module, factor: float) -> nn.Module:
    """Multiply every layer's query and key projections by ``factor`` (logits by ``factor**2``).

    Attention logits are ``q . k``, so this makes the softmax peakier without changing which
    keys a query prefers; values and everything else are untouched. In place; returns ``model``.
    """
    import torch

    from vit_explain.eager import attention_modules

    with torch.no_grad():
        for attention in attention_modules(model):
            for tensor, rows in _query_key_projections(attention):
                tensor[rows] *= factor
    return model


def randomize_untrained_parameters(model: nn.Module, seed: int, head_gain: float = 3.0) -> nn.Module:
    """Give the parameters timm initialises to constants random, non-trivial values. In place.

    * biases (timm: zeros) so a dropped bias term would show in the parity check;
    * class, distillation and register tokens (timm: ~1e-6 or zeros) so prefix tokens differ
      from each other: identical tokens create exactly tied attention values, and the discard
      step then has no well-defined answer;
    * layer-scale factors (DINOv2 init: 1e-5) to O(1), otherwise every block is almost the
      identity and layer L sees the same input as layer 1, which would hide a layer-order bug;
    * BEiT's relative position bias tables (zeros) so the bias is actually exercised;
    * classifier heads (std 0.02, or 0.02 * 0.001 for BEiT/EVA) to logits of a few units, as in a
      trained model: gradient rollout adds ``A * G`` to the identity, so with tiny gradients every
      layer is ~I and the mask is ~uniform whatever the maths does.
    """
    import torch

    generator = torch.Generator().manual_seed(10_000 + seed)

    def noise(tensor: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.randn(tensor.shape, generator=generator) * scale

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("cls_token", "dist_token", "reg_token"):
                parameter.copy_(noise(parameter, 0.5))
            elif leaf == "relative_position_bias_table":
                parameter.copy_(noise(parameter, 0.5))
            elif leaf in ("gamma", "gamma_1", "gamma_2"):  # layer scale (timm LayerScale, BEiT)
                parameter.copy_(0.5 + 0.5 * torch.rand(parameter.shape, generator=generator))
            elif name in ("head.weight", "head_dist.weight"):
                parameter.copy_(noise(parameter, head_gain / parameter.shape[1] ** 0.5))
            elif leaf.endswith("bias"):  # bias, q_bias, v_bias
                parameter.add_(noise(parameter, 0.05))
    return model


# --------------------------------------------------------------------------- #
# The families under test
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Family:
    """One small timm model configuration to export; ``key`` is the pytest id."""

    key: str
    name: str
    create_kwargs: dict = field(default_factory=dict)
    seed: int = 0
    sharpen: float = 4.0  # chosen per family: mean max-probability ~8-15x uniform, max < 0.99
    head_gain: float = 3.0  # classifier weights ~ gain / sqrt(width): logits of a few units

    def build(self) -> nn.Module:
        import timm
        import torch

        torch.manual_seed(self.seed)
        model = timm.create_model(self.name, pretrained=False, **self.create_kwargs)
        randomize_untrained_parameters(model, self.seed, self.head_gain)
        sharpen_attention(model, self.sharpen)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model.eval()


FAMILIES: dict[str, Family] = {
    family.key: family
    for family in (
        # class token, 14x14 grid, 3 layers
        Family("deit", "deit_tiny_patch16_224", dict(depth=3), seed=0),
        # a second seed, 7x7 grid
        Family("deit-seed1", "deit_tiny_patch16_224", dict(depth=2, img_size=112), seed=1),
        # non-square 6x8 grid, class + distillation token
        Family("deit-distilled", "deit_tiny_distilled_patch16_224", dict(depth=2, img_size=(96, 128)), seed=2),
        # feature model (no head), class + 4 register tokens, layer scale
        Family("dinov2-reg4", "vit_small_patch14_reg4_dinov2", dict(depth=2, img_size=98, num_classes=0), seed=3,
               sharpen=3.0),
        # no class token: the mask is the mean of the patch rows. Mean pooling also averages the
        # gradient over all patches, so a larger head is needed for gradient rollout to move
        # away from the uniform start vector.
        Family("vit-gap", "vit_medium_patch16_gap_256", dict(depth=2, img_size=96), seed=4, sharpen=3.0,
               head_gain=20.0),
        # BEiT (q/v biases, relative position bias) and EVA-02 (rotary embeddings, SwiGLU) pool the
        # patch tokens by default (global_pool="avg"), so their class token never reaches the
        # output and gradient rollout from the class row is ~0 (see test_parity.py::
        # test_rollout_of_an_average_pooled_model_starts_from_the_pooled_tokens). The parity
        # tests read the class token instead; the attention is the same either way.
        Family("beit", "beit_base_patch16_224", dict(depth=2, embed_dim=192, num_heads=3, global_pool="token"),
               seed=5),
        Family("eva02", "eva02_tiny_patch14_224", dict(depth=2, img_size=112, num_classes=10, global_pool="token"),
               seed=6),
    )
}


@dataclass
class ExportedModel:
    """An exported family: the ONNX file, the eager model it came from, and the export result."""

    family: Family
    path: Path
    model: nn.Module
    result: Any  # vit_explain.export.ExportResult

    @property
    def metadata(self):
        return self.result.metadata


@pytest.fixture(scope="session")
def export_family(tmp_path_factory) -> Callable[[str], ExportedModel]:
    """``export_family(key)``: the family exported once per session (on first use), then cached."""
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    from vit_explain.export.exporter import export_model
    from vit_explain.families import ModelSpec

    cache: dict[str, ExportedModel] = {}
    directory = tmp_path_factory.mktemp("exported")

    def get(key: str) -> ExportedModel:
        if key not in cache:
            family = FAMILIES[key]
            model = family.build()
            path = directory / f"{key}.onnx"
            spec = ModelSpec(family.name, weights="random", seed=family.seed)
            result = export_model(spec, path, model=model)
            cache[key] = ExportedModel(family, path, model, result)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def make_test_model() -> Callable[..., nn.Module]:
    """``make_test_model(name, seed=0, sharpen=4.0, head_gain=3.0, **create_kwargs)``: any timm model,
    prepared like the exported families (testable parameters, sharpened attention, frozen, eval)."""
    pytest.importorskip("torch")
    pytest.importorskip("timm")

    def make(name: str, seed: int = 0, sharpen: float = 4.0, head_gain: float = 3.0, **create_kwargs) -> nn.Module:
        return Family(name, name, create_kwargs, seed=seed, sharpen=sharpen, head_gain=head_gain).build()

    return make


def pytest_generate_tests(metafunc) -> None:
    """A test that takes ``family_key`` runs once per family, with the key as its id."""
    if "family_key" in metafunc.fixturenames:
        metafunc.parametrize("family_key", sorted(FAMILIES))


# --------------------------------------------------------------------------- #
# Comparing masks computed from slightly different tensors
# --------------------------------------------------------------------------- #

#: Relative (to the mask's max, 1) difference allowed between masks whose inputs differ only by
#: float noise. The graph matches eager PyTorch to ~2e-6 relative (attentions); rollout rows
#: (probability mass, <= 1) then agree to ~2e-6 relative to their peak, measured on every family.
MASK_TOLERANCE = 1e-5
#: Absolute noise floor on unscaled rollout rows. Where little relevance reaches the patches (peak
#: below ~1e-3, as with min-fused gradient rollout, whose entries are clamped near-cancellations of
#: A * G) the rows carry float32 noise of the *gradients'* scale: measured <= 4e-9. Scaling to max 1
#: divides that by the peak (and moves the peak by as much): ``2 * ROW_NOISE / peak`` on the mask.
ROW_NOISE = 1e-8


def fused_maps(attentions: np.ndarray, gradients: np.ndarray | None, head_fusion: str) -> np.ndarray:
    """Each layer's fused map before the discard step, ``[L, B, N * N]`` float64 (the rollout's step 1)."""
    from vit_explain.methods.fusion import fuse_heads

    fused = []
    for layer, attention in enumerate(attentions.astype(np.float64)):
        if gradients is None:
            fused.append(fuse_heads(attention, head_fusion))
        else:
            fused.append(np.maximum(fuse_heads(attention * gradients[layer], head_fusion), 0.0))
    return np.stack(fused).reshape(len(fused), attentions.shape[1], -1)


def _lowest(values: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks: the ``count`` lowest entries (stable order), and the entries tied at the
    boundary when the boundary is an exact tie (whichever of those a discard picks is arbitrary)."""
    order = np.argsort(values, kind="stable")
    lowest = np.zeros(values.shape, dtype=bool)
    lowest[order[:count]] = True
    lo, hi = values[order[count - 1]], values[order[count]]
    tied = values == lo if lo == hi else np.zeros(values.shape, dtype=bool)
    return lowest, tied


def discard_disagreement(fused_a: np.ndarray, fused_b: np.ndarray, discard_ratio: float) -> np.ndarray:
    """Per image, the total value of the entries that the discard step may zero on one side and
    keep on the other, summed over layers (``fused_*``: ``[L, B, N*N]``). Zero when both sides
    certainly discard the same entries.

    Counted: entries among the ``k`` lowest of ``a`` but not of ``b`` or the reverse, and entries
    in an exact tie at either boundary (numpy's argpartition and torch's topk break ties
    differently). Flat index 0 is never counted: it is spared either way. An entry zeroed on only
    one side changes that side's map by its own value, at most ``max(a, b)`` there.
    """
    layers, batch, size = fused_b.shape
    count = int(size * discard_ratio)
    mass = np.zeros(batch)
    if count == 0:
        return mass
    for layer in range(layers):
        for item in range(batch):
            a, b = fused_a[layer, item], fused_b[layer, item]
            lowest_a, tied_a = _lowest(a, count)
            lowest_b, tied_b = _lowest(b, count)
            differ = (lowest_a != lowest_b) | tied_a | tied_b
            differ[0] = False
            mass[item] += float(np.maximum(a, b)[differ].sum())
    return mass


@dataclass(frozen=True)
class MaskComparison:
    """Per image: the allowed mask difference and whether it is the plain float-noise bound."""

    tolerance: np.ndarray
    tight: np.ndarray  # both sides discarded exactly the same entries
    peak: np.ndarray  # the unscaled rollout row's max on side b


def mask_comparison(
    attentions_a: np.ndarray,
    gradients_a: np.ndarray | None,
    attentions_b: np.ndarray,
    gradients_b: np.ndarray | None,
    head_fusion: str,
    discard_ratio: float,
    num_prefix_tokens: int,
    has_class_token: bool,
) -> MaskComparison:
    """How much the scaled rollout masks of tensors ``a`` and ``b`` may justifiably differ.

    * Float noise: ``MASK_TOLERANCE + 2 * ROW_NOISE / peak`` (see those constants).
    * Discard swaps, when a ~1e-7 difference moves an entry across the discard boundary: changing
      a fused map by ``D`` (L1 norm ``d``) changes its normalised rows ``(F + I) / rowsum`` by at
      most ``2 d`` in L1 (every row sum is >= 1), hence the rolled-out row vector (a probability
      vector) by at most ``2 d``; the other layers are row-stochastic and never increase an L1
      difference. With ``d`` summed over layers (:func:`discard_disagreement`), the unscaled rows
      differ by at most ``2 d`` more, and after dividing by the peak ``p`` (itself moved by at most
      as much) the masks by at most ``4 d / (p - 2 d)``.
    """
    from vit_explain.methods.relevance import rollout_rows

    mass = discard_disagreement(
        fused_maps(attentions_a, gradients_a, head_fusion),
        fused_maps(attentions_b, gradients_b, head_fusion),
        discard_ratio,
    )
    layout = (discard_ratio, num_prefix_tokens, has_class_token)
    peak_a = rollout_rows(attentions_a, gradients_a, head_fusion, *layout).max(axis=-1)
    peak = rollout_rows(attentions_b, gradients_b, head_fusion, *layout).max(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        noise = MASK_TOLERANCE + 2 * ROW_NOISE / peak
        swaps = np.where(mass > 0, 4 * mass / np.maximum(peak - 2 * mass, 0.0), 0.0)
    tolerance = noise + swaps
    # Nothing reaches the patches on side b (all-zero mask): side a may only have noise there,
    # which its scaling blows up to 1, so its mask cannot be compared; a real peak must not exist.
    nothing = peak == 0
    only_noise = nothing & (peak_a > 0) & (peak_a <= ROW_NOISE)
    tolerance[nothing] = MASK_TOLERANCE
    tolerance[only_noise] = np.inf
    return MaskComparison(tolerance, (mass == 0) & ~nothing, peak)


@pytest.fixture(scope="session")
def compare_masks() -> Callable[..., MaskComparison]:
    """:func:`mask_comparison`, for tests that compare masks computed from different tensors."""
    return mask_comparison


# --------------------------------------------------------------------------- #
# Measured parity, printed at the end of the run (the README's families table)
# --------------------------------------------------------------------------- #

_MEASURED_KEY = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def parity_record(request) -> Callable[[str, str, float], None]:
    """``record(family_key, quantity, value)`` keeps the largest value seen per family and quantity."""
    measured = request.config.stash.setdefault(_MEASURED_KEY, {})

    def record(key: str, quantity: str, value: float) -> None:
        row = measured.setdefault(key, {})
        row[quantity] = max(row.get(quantity, 0.0), float(value))

    return record


def pytest_terminal_summary(terminalreporter, config) -> None:
    measured = config.stash.get(_MEASURED_KEY, {})
    if not measured:
        return
    quantities = sorted({q for row in measured.values() for q in row})
    terminalreporter.section("measured ONNX vs eager PyTorch (largest over the cases run)")
    terminalreporter.write_line("family".ljust(16) + "".join(q.rjust(20) for q in quantities))
    for key in sorted(measured):
        cells = "".join(
            (f"{measured[key][q]:.1e}" if q in measured[key] else "-").rjust(20) for q in quantities
        )
        terminalreporter.write_line(key.ljust(16) + cells)
