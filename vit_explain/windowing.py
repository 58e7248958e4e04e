"""The token layout of a windowed, hierarchical model (Swin): stage grids, windows, shifts, merges.

Why its own module: the exporter writes it (from the model), the metadata checks it, the session
splits the graph's packed attention output with it and the windowed relevance maths walks it, and
none of these may import torch or (for the metadata) numpy. Standard library only.

The layout, as the definition in the README states it: the tokens of stage ``s`` form an
``H_s x W_s`` grid in row-major order, with no prefix tokens. Stage ``s + 1`` is made by patch
merging: merged token ``(i, j)`` is built from the four tokens ``(2i + p, 2j + q)`` of stage
``s``, so ``H_{s+1} = ceil(H_s / 2)`` (an odd grid is padded first, as timm does). Each block of a
stage cyclically shifts its grid by ``-shift`` (timm's ``torch.roll``), pads it at the bottom and
right to whole windows, and attends within each ``window`` of that padded grid (transformers
pads first and rolls the padded grid: ``pad_before_shift``).

The graph returns each block's attention per image as ``[windows, heads, w*w, w*w]`` (windows in
row-major order of the padded, shifted grid), flattened and concatenated in block order into one
``[B, values]`` array (:attr:`WindowedLayout.packed_values`), since the blocks' shapes differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["WindowBlock", "WindowedLayout", "WindowLayoutError", "layout_of", "describe_windows"]


class WindowLayoutError(ValueError):
    """A windowed layout that contradicts itself (the metadata turns it into a MetadataError)."""


def _pair(name: str, value: Any, minimum: int) -> tuple[int, int]:
    if not (
        isinstance(value, (list, tuple)) and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value)
    ):
        raise WindowLayoutError(f"'{name}' must be 2 integers >= {minimum} (got {value!r})")
    return int(value[0]), int(value[1])


@dataclass(frozen=True)
class WindowBlock:
    """One block: its stage, window and cyclic shift (rows, columns), and its heads."""

    stage: int
    window: tuple[int, int]
    shift: tuple[int, int]
    heads: int


@dataclass(frozen=True)
class WindowedLayout:
    """Stage grids (stage 0 is the patch grid) and the blocks in order (stages non-decreasing)."""

    stage_grids: tuple[tuple[int, int], ...]
    blocks: tuple[WindowBlock, ...]
    #: timm rolls the grid, then pads it; transformers pads, then rolls the padded grid.
    pad_before_shift: bool = False

    # -- derived sizes -------------------------------------------------------------------
    def grid(self, block: int) -> tuple[int, int]:
        return self.stage_grids[self.blocks[block].stage]

    def padded(self, block: int) -> tuple[int, int]:
        """The grid the block partitions: padded at the bottom and right to whole windows."""
        (rows, columns), (wh, ww) = self.grid(block), self.blocks[block].window
        return -(-rows // wh) * wh, -(-columns // ww) * ww

    def num_windows(self, block: int) -> int:
        (rows, columns), (wh, ww) = self.padded(block), self.blocks[block].window
        return (rows // wh) * (columns // ww)

    def window_area(self, block: int) -> int:
        wh, ww = self.blocks[block].window
        return wh * ww

    def block_values(self, block: int) -> int:
        """Values per image of one block's attention: windows x heads x area x area."""
        area = self.window_area(block)
        return self.num_windows(block) * self.blocks[block].heads * area * area

    def block_shape(self, block: int) -> tuple[int, int, int, int]:
        """``(windows, heads, area, area)``: one image's attention of ``block``."""
        area = self.window_area(block)
        return self.num_windows(block), self.blocks[block].heads, area, area

    @property
    def packed_values(self) -> int:
        """Width of the graph's packed attention output: every block's values, per image."""
        return sum(self.block_values(block) for block in range(len(self.blocks)))

    def offsets(self) -> list[int]:
        """Where each block starts in the packed row (and, last, its end)."""
        starts = [0]
        for block in range(len(self.blocks)):
            starts.append(starts[-1] + self.block_values(block))
        return starts

    @property
    def num_tokens(self) -> int:
        """Tokens of the first stage (the mask's grid)."""
        rows, columns = self.stage_grids[0]
        return rows * columns

    def describe(self) -> dict[str, str]:
        """For ``vit-explain info``: each stage's grid, blocks, windows, shifts and heads."""
        stages = []
        for stage, (rows, columns) in enumerate(self.stage_grids):
            blocks = [b for b in self.blocks if b.stage == stage]
            windows = "/".join(sorted({f"{b.window[0]}x{b.window[1]}" for b in blocks}))
            shifts = "/".join(sorted({f"{b.shift[0]}x{b.shift[1]}" for b in blocks}))
            heads = "/".join(sorted({str(b.heads) for b in blocks}))
            stages.append(f"{rows}x{columns} ({len(blocks)} blocks, window {windows}, shift {shifts}, heads {heads})")
        return {"windowed stages": " -> ".join(stages), "patch merging": "2x2 between stages"}

    # -- JSON (the metadata's ``windows`` field) -----------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "stage_grids": [list(grid) for grid in self.stage_grids],
            "blocks": [
                {"stage": b.stage, "window": list(b.window), "shift": list(b.shift), "heads": b.heads}
                for b in self.blocks
            ],
            "merge": "2x2",
            "pad_before_shift": self.pad_before_shift,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> WindowedLayout:
        """Parse and check: every stage after the first is the 2x2 merge of the one before, every
        block's shift is smaller than its window, the stages are visited in order."""
        if not isinstance(raw, dict):
            raise WindowLayoutError(f"must be a JSON object (got {raw!r})")
        if raw.get("merge") != "2x2":
            raise WindowLayoutError(f"'merge' must be \"2x2\" (got {raw.get('merge')!r})")
        grids_raw, blocks_raw = raw.get("stage_grids"), raw.get("blocks")
        if not isinstance(grids_raw, list) or not grids_raw:
            raise WindowLayoutError(f"'stage_grids' must be a non-empty list (got {grids_raw!r})")
        if not isinstance(blocks_raw, list) or not blocks_raw:
            raise WindowLayoutError(f"'blocks' must be a non-empty list (got {blocks_raw!r})")
        grids = tuple(_pair("stage_grids", grid, 1) for grid in grids_raw)
        for stage in range(1, len(grids)):
            expected = tuple(-(-v // 2) for v in grids[stage - 1])
            if grids[stage] != expected:
                raise WindowLayoutError(
                    f"stage {stage}'s grid {grids[stage]} is not the 2x2 merge of {grids[stage - 1]} ({expected})"
                )
        blocks = []
        for index, item in enumerate(blocks_raw):
            if not isinstance(item, dict):
                raise WindowLayoutError(f"block {index} must be a JSON object (got {item!r})")
            stage, heads = item.get("stage"), item.get("heads")
            if not (isinstance(stage, int) and not isinstance(stage, bool) and 0 <= stage < len(grids)):
                raise WindowLayoutError(f"block {index}'s stage must be in 0..{len(grids) - 1} (got {stage!r})")
            if not (isinstance(heads, int) and not isinstance(heads, bool) and heads > 0):
                raise WindowLayoutError(f"block {index}'s heads must be a positive integer (got {heads!r})")
            window = _pair(f"block {index}'s window", item.get("window"), 1)
            shift = _pair(f"block {index}'s shift", item.get("shift"), 0)
            if any(s >= w for s, w in zip(shift, window, strict=True)):
                raise WindowLayoutError(f"block {index}'s shift {shift} must be smaller than its window {window}")
            if blocks and stage < blocks[-1].stage:
                raise WindowLayoutError(f"block {index} goes back to stage {stage}")
            blocks.append(WindowBlock(stage, window, shift, heads))
        if blocks[0].stage != 0 or blocks[-1].stage != len(grids) - 1:
            raise WindowLayoutError("the blocks must start in stage 0 and end in the last stage")
        pad_first = raw.get("pad_before_shift", False)
        if not isinstance(pad_first, bool):
            raise WindowLayoutError(f"'pad_before_shift' must be true or false (got {pad_first!r})")
        return cls(grids, tuple(blocks), pad_first)


def layout_of(meta: Any) -> WindowedLayout | None:
    """The windowed layout of a model's metadata (its ``windows`` field), checked against the
    rest of it (the first stage is the patch grid, one block per layer, no prefix tokens); None
    for a model with global attention. A contradiction is one :class:`WindowLayoutError` line
    naming the field (the runtime's file checks raise it as a ``MetadataError``)."""
    if meta.windows is None:
        return None
    try:
        layout = WindowedLayout.from_dict(meta.windows)
        if meta.num_prefix_tokens != 0 or meta.has_class_token:
            raise WindowLayoutError("a windowed model has no prefix tokens and no class token")
        if layout.stage_grids[0] != tuple(meta.grid_size):
            raise WindowLayoutError(f"the first stage {layout.stage_grids[0]} is not the patch grid {tuple(meta.grid_size)}")
        if len(layout.blocks) != meta.num_layers:
            raise WindowLayoutError(f"{len(layout.blocks)} blocks listed for {meta.num_layers} layers")
    except WindowLayoutError as exc:
        shown = repr(meta.windows)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise WindowLayoutError(f"metadata field 'windows' is inconsistent: {exc} (got {shown})") from None
    return layout


def describe_windows(windows: dict[str, Any] | None) -> dict[str, str]:
    """``vit-explain info``'s lines for a windowed model (none for a ViT)."""
    if windows is None:
        return {}
    try:
        return WindowedLayout.from_dict(windows).describe()
    except WindowLayoutError as exc:
        return {"windowed stages": f"inconsistent ({exc})"}
