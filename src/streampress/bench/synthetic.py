"""A synthetic video made in memory: textured background, moving shapes, a static stretch.

The benchmark's built-in input, so that ``streampress bench`` needs no download. It has what
streaming methods react to: a background that never changes (temporal redundancy), objects
that move (tokens that must be kept), and a stretch in the middle where nothing moves at all
(identical frames, which temporal pruning and encoder caching should make almost free).
"""

from __future__ import annotations

import numpy as np

__all__ = ["synthetic_video"]


def synthetic_video(num_frames: int = 16, size: tuple[int, int] = (448, 448), fps: float = 1.0,
                    static_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """Return ``(frames uint8 [N, H, W, 3], timestamps)`` with ``size = (width, height)``.

    Frames in the middle ``static_fraction`` of the video are identical (the shapes stop).
    The same arguments always give the same frames.
    """
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    width, height = size
    if width < 8 or height < 8:
        raise ValueError(f"size must be at least 8x8, got {size!r}")
    if not 0 <= static_fraction < 1:
        raise ValueError(f"static_fraction must be in [0, 1), got {static_fraction!r}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # Background: a colour gradient with fixed fine texture (so no two tokens are identical).
    background = np.stack([60 + 80 * xx / width, 70 + 60 * yy / height, 110 - 40 * xx / width], axis=-1)
    background += rng.normal(0, 6, size=(height, width, 3))

    # Motion time: advances with the frame index except during the static stretch.
    n_static = int(round(num_frames * static_fraction))
    start = (num_frames - n_static) // 2
    index = np.arange(num_frames)
    # frames start .. start + n_static - 1 share one motion time; motion resumes right after
    motion_t = np.where(index < start, index, np.maximum(start, index - n_static + 1)).astype(np.float32)

    shapes = [  # (kind, colour, size as a fraction of the short side, start x, start y, vx, vy)
        ("disc", (235, 70, 60), 0.14, 0.2, 0.3, 0.07, 0.05),
        ("box", (250, 220, 70), 0.18, 0.7, 0.2, -0.05, 0.06),
        ("ring", (70, 200, 120), 0.12, 0.4, 0.75, 0.06, -0.04),
    ]
    short = min(width, height)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        img = background.copy()
        for kind, colour, frac, x0, y0, vx, vy in shapes:
            # bounce inside the unit square: a triangle wave of the unwrapped position
            cx = width * _bounce(x0 + vx * motion_t[i])
            cy = height * _bounce(y0 + vy * motion_t[i])
            r = frac * short / 2
            if kind == "box":
                mask = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
            else:
                d2 = (xx - cx) ** 2 + (yy - cy) ** 2
                mask = d2 <= r * r if kind == "disc" else (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
            img[mask] = colour
        frames[i] = np.clip(img, 0, 255).astype(np.uint8)
    timestamps = [i / fps for i in range(num_frames)]
    return frames, timestamps


def _bounce(p: float) -> float:
    """Map an unbounded coordinate to [0.1, 0.9] by reflecting at the edges."""
    p = p % 2.0
    p = 2.0 - p if p > 1.0 else p
    return 0.1 + 0.8 * p
