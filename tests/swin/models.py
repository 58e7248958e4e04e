"""The small Swin configurations the Swin tests use (random init, made testable as the ViT families).

- ``padded``: 80 px, window 6, two stages of two blocks: the 20x20 and 10x10 grids are padded to
  24x24 and 12x12 and the second block of each stage is shifted by 3 (shift and padding together).
- ``three-stage``: 88 px, window 4, depths 1/2/1: grids 22x22 -> 11x11 -> 6x6 (an odd grid merged,
  timm pads it), the 11x11 stage padded to 12x12 and shifted by 2, the last stage one window.

The head is scaled up (``head_gain``): Swin averages every last-stage token, so at timm's init
the attention gradients are ~1e-5 of the attention and gradient rollout would be uniform.
"""

from __future__ import annotations

from tests.helpers.models import Family

SWIN = "swin_tiny_patch4_window7_224"
CONFIGS = {
    "padded": Family(
        "swin-padded", SWIN,
        dict(embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=6, img_size=80, num_classes=10),
        seed=0, head_gain=1000.0,
    ),
    "three-stage": Family(
        "swin-three-stage", SWIN,
        dict(embed_dim=32, depths=(1, 2, 1), num_heads=(2, 2, 4), window_size=4, img_size=88, num_classes=10),
        seed=1, head_gain=1000.0,
    ),
}
