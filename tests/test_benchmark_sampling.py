"""The frame sampling of benchmarks/vit_cache.py: live-stream ticks vs Qwen2.5-VL's own rule."""

from __future__ import annotations

import importlib.util
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vit_cache():
    spec = importlib.util.spec_from_file_location("vit_cache_script", ROOT / "benchmarks" / "vit_cache.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _video(path: Path, n: int, rate: Fraction) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(n):
            img = np.full((32, 32, 3), i % 256, np.uint8)  # frame index in the pixel value
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# (frames, rate) like the shared clips; expected counts at 2 fps: Qwen's rule floors
# duration * fps to an even number, the stream ticks take every frame at or after k / 2 s.
@pytest.mark.parametrize("n,rate,qwen,stream", [(247, Fraction(24), 20, 21),
                                                (289, Fraction(30000, 1001), 18, 20),
                                                (300, Fraction(30000, 1001), 20, 20)])
def test_sampling_counts(vit_cache, tmp_path, n, rate, qwen, stream):
    path = _video(tmp_path / "v.mp4", n, rate)
    q = vit_cache.decode(path, 2.0, 28, "qwen")
    s = vit_cache.decode(path, 2.0, 28, "stream")
    assert len(q) == qwen and len(s) == stream
    # Qwen's frames spread over the whole clip: first and last frame included, evenly spaced
    idx = np.round(np.linspace(0, n - 1, qwen)).astype(int)
    got = q[:, 16, 16, 0].astype(int)
    assert np.abs(got - idx % 256).max() <= 6  # lossy codec: pixel value ~ frame index
    with pytest.raises(ValueError, match="sampling"):
        vit_cache.decode(path, 2.0, 28, "every")
