"""Decoded, fps-sampled frames of a video file: the one place the harness touches a decoder.

:func:`streampress.video.open_video` decodes sequentially with the container's timestamps
and keeps, for every tick ``k / fps``, the first frame at or after it; decoding stops as soon
as the caller stops iterating (a question near the start of a long video costs only the
frames up to it).
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np


def iter_frames(path: str | os.PathLike, fps: float | None) -> Iterator[tuple[np.ndarray, float]]:
    """Yield ``(image uint8 [H, W, 3], timestamp seconds)`` in time order, sampled at ``fps``
    (None = every frame). Errors are :class:`streampress.video.VideoError` (a ValueError)."""
    from streampress.video import open_video

    if fps is not None and not fps > 0:
        raise ValueError(f"fps: expected a positive number or None, got {fps!r}")
    source = open_video(str(path), fps=fps)
    try:
        for frame in source:
            yield frame.image, float(frame.timestamp)
    finally:
        source.close()
