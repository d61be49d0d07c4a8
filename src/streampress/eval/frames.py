"""Decoded, fps-sampled frames of a video file: the one place the harness touches a decoder.

:func:`streampress.video.open_video` decodes sequentially with the container's timestamps
and keeps, for every tick ``k / fps``, the first frame at or after it; decoding stops as soon
as the caller stops iterating (a question near the start of a long video costs only the
frames up to it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np


def iter_frames(path: str | os.PathLike, fps: float | None, size=None) -> Iterator[tuple[np.ndarray, float]]:
    """Yield ``(image uint8 [H, W, 3], timestamp seconds)`` in time order, sampled at ``fps``
    (None = every frame), resized to ``size`` (see ``open_video``; None: as decoded). Errors
    are :class:`streampress.video.VideoError` (a ValueError)."""
    from streampress.video import open_video

    with open_video(str(path), fps=fps, size=size) as source:  # checks fps; closing stops the decoder
        for frame in source:
            yield frame.image, frame.timestamp
