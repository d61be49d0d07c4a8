"""Video sources: timestamps, resampling, sizes, folders, live URLs and every error path.

The tests write their own tiny videos with PyAV (64x48, moving square, a static stretch and
a scene cut), so nothing is downloaded and every expectation is computed by hand.
"""

from __future__ import annotations

import functools
import http.server
import sys
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from streampress.video import Frame, VideoError, VideoSource, _Ticker, open_video

W, H, N, RATE = 64, 48, 20, 10
STATIC = range(8, 14)  # frames 8..13 are identical
CUT = 14  # the scene changes at frame 14


def synthetic_frame(i: int, width: int = W, height: int = H) -> np.ndarray:
    """Frame ``i`` of the test clip: a moving square, then a static stretch, then a scene cut."""
    img = np.full((height, width, 3), 30, np.uint8)
    if i >= CUT:  # new scene: bright background, a dark square moving down
        img[:] = (200, 180, 60)
        y = 4 + 3 * (i - CUT)
        img[y:y + 12, 20:32] = (20, 20, 120)
        return img
    x = 4 + 4 * min(i, STATIC.start)  # moves right, then stops for the static stretch
    img[16:32, x:x + 16] = (230, 40, 40)
    return img


def make_video(path, n=N, rate=RATE, codec="mpeg4", width=W, height=H, faststart=False,
               pts_ms=None) -> Path:
    """Encode ``n`` synthetic frames to ``path``; ``pts_ms`` gives explicit times (variable rate)."""
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 2_000_000
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(synthetic_frame(i, width, height), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return Path(path)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_video(tmp_path_factory.mktemp("clip") / "clip.mp4")


def test_file_timestamps_indices_and_pixels(clip):
    frames = list(open_video(clip))
    assert [f.index for f in frames] == list(range(N))
    assert [f.timestamp for f in frames] == pytest.approx([i / RATE for i in range(N)], abs=1e-9)
    for f in frames:
        assert isinstance(f, Frame) and f.image.dtype == np.uint8 and f.image.shape == (H, W, 3)
        assert np.abs(f.image.astype(int) - synthetic_frame(f.index)).mean() < 6  # lossy but close
    # the static stretch decodes to near-identical frames; the scene cut is a big jump
    static_diff = max(np.abs(frames[i].image.astype(int) - frames[i + 1].image).mean() for i in STATIC[:-1])
    cut_diff = np.abs(frames[CUT].image.astype(int) - frames[CUT - 1].image).mean()
    assert static_diff < 2 < 50 < cut_diff


def test_metadata(clip):
    source = open_video(clip)
    info = source.info
    assert (info.kind, info.width, info.height, info.frame_count) == ("file", W, H, N)
    assert info.fps == pytest.approx(RATE)
    assert info.duration == pytest.approx(N / RATE)
    assert not source.live
    assert source.estimated_frames() == N
    assert open_video(clip, fps=4).estimated_frames() == 8
    assert open_video(clip, fps=4, max_frames=3).estimated_frames() == 3


@pytest.mark.parametrize("fps, expected", [
    (4, [0, 3, 5, 8, 10, 13, 15, 18]),  # ticks 0, .25, .5, .75, ...: first frame at or after each
    (1, [0, 10]),
    (10, list(range(N))),
    (25, list(range(N))),  # faster than the source: every frame once, never repeated
    (3, [0, 4, 7, 10, 14, 17]),  # ticks 0, .333, .667, 1, 1.333, 1.667
])
def test_resampling_keeps_first_frame_at_or_after_each_tick(clip, fps, expected):
    frames = list(open_video(clip, fps=fps))
    assert [f.index for f in frames] == expected
    for f in frames:  # the timestamp is the frame's own, not the tick's
        assert f.timestamp == pytest.approx(f.index / RATE)


def test_variable_frame_rate_uses_real_timestamps(tmp_path):
    times_ms = [0, 100, 150, 400, 1000, 1050, 1700, 2300]
    path = make_video(tmp_path / "vfr.mp4", n=len(times_ms), pts_ms=times_ms)
    frames = list(open_video(path))
    assert [f.timestamp for f in frames] == pytest.approx([t / 1000 for t in times_ms])
    # 2 fps: ticks 0, .5, 1, 1.5, 2 -> frames at 0, 1.0 (covers .5 and 1.0), 1.7, 2.3
    assert [f.index for f in open_video(path, fps=2)] == [0, 4, 6, 7]


def test_ticker_does_not_drift_over_an_hour():
    ticker = _Ticker(1.0)
    rate = 30000 / 1001
    times = np.arange(int(3600 * rate)) / rate
    kept = [t for t in times if ticker.take(float(t))]
    assert len(kept) == 3600
    ticks = np.arange(3600)
    assert np.all(np.asarray(kept) >= ticks - 1e-9) and np.all(np.asarray(kept) < ticks + 1 / rate)


def test_max_frames_size_and_repeatable_iteration(clip):
    source = open_video(clip, max_frames=5, size=(32, 24))
    first = [f.image for f in source]
    again = [f.image for f in source]
    assert len(first) == 5 and all(img.shape == (24, 32, 3) for img in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert source.info.width == 32 and source.info.height == 24
    longer_side = open_video(clip, size=32)  # keeps the 4:3 aspect
    assert (longer_side.info.width, longer_side.info.height) == (32, 24)
    assert next(iter(longer_side)).image.shape == (24, 32, 3)


def test_close_stops_a_running_iteration(clip):
    source = open_video(clip)
    frames = iter(source)
    assert next(frames).index == 0
    source.close()
    with pytest.raises(StopIteration):
        next(frames)
    assert next(iter(source)).index == 0  # a file can still be read again from the start


def test_chunks(clip):
    chunks = list(open_video(clip, fps=4).chunks(3))
    assert [c[0].shape[0] for c in chunks] == [3, 3, 2]
    assert chunks[0][0].dtype == np.uint8 and chunks[0][0].shape[1:] == (H, W, 3)
    assert chunks[1][1] == pytest.approx([0.8, 1.0, 1.3])


def test_image_folder(tmp_path):
    for i in range(12):  # natural order: img2 before img10
        Image.fromarray(synthetic_frame(i)).save(tmp_path / f"img{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    frames = list(open_video(tmp_path))
    assert [f.index for f in frames] == list(range(12))
    assert [f.timestamp for f in frames] == [float(i) for i in range(12)]  # default 1 image per second
    assert all(np.array_equal(f.image, synthetic_frame(f.index)) for f in frames)  # PNG is lossless
    assert open_video(tmp_path).info.duration == 12.0
    # images taken at 4 per second, resampled to 2 fps: every other image
    resampled = list(open_video(tmp_path, fps=2, image_fps=4))
    assert [f.index for f in resampled] == [0, 2, 4, 6, 8, 10]
    assert [f.timestamp for f in resampled] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    # fps alone also sets the images' rate (each image kept)
    assert [f.timestamp for f in open_video(tmp_path, fps=2)][:3] == [0.0, 0.5, 1.0]
    assert next(iter(open_video(tmp_path, size=(16, 12)))).image.shape == (12, 16, 3)


def test_image_folder_errors(tmp_path):
    with pytest.raises(VideoError, match="no images"):
        open_video(tmp_path)
    Image.fromarray(synthetic_frame(0)).save(tmp_path / "a0.png")
    Image.fromarray(synthetic_frame(1, 32, 32)).save(tmp_path / "a1.png")
    (tmp_path / "a2.png").write_bytes(b"broken")
    with pytest.raises(VideoError, match=r"a1\.png: image 1 is 32x32.*size="):
        list(open_video(tmp_path))
    with pytest.raises(VideoError, match=r"a2\.png: cannot read image 2"):
        list(open_video(tmp_path, size=(8, 8)))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(VideoError, match="no such file"):
        open_video(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match="empty"):
        open_video(tmp_path / "empty.mp4")
    assert issubclass(VideoError, ValueError)


def test_random_bytes_and_text_are_not_videos(tmp_path):
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    (tmp_path / "notes.mp4").write_text("What is on the table?\n" * 20)
    for name in ("noise.mp4", "notes.mp4"):
        with pytest.raises(VideoError, match=name):
            list(open_video(tmp_path / name))


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        samples = (np.sin(np.arange(800) / 5) * 1000).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(VideoError, match="no video stream.*audio"):
        open_video(path)


def test_truncated_file_names_the_frame(tmp_path):
    good = make_video(tmp_path / "good.mp4", n=40, faststart=True)  # index first, so data can be cut
    data = good.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 6 // 10])
    source = open_video(cut)  # the header is intact: opening works
    with pytest.raises(VideoError, match=r"cut\.mp4: decod\w+ \w+ at frame (\d+)") as err:
        list(source)
    stopped = int(err.value.args[0].split("at frame ")[1].split()[0])
    assert 10 <= stopped < 40
    # the default layout (index at the end) cut short cannot even be opened
    plain = make_video(tmp_path / "plain.mp4").read_bytes()
    (tmp_path / "plain_cut.mp4").write_bytes(plain[: len(plain) // 2])
    with pytest.raises(VideoError, match="plain_cut.mp4"):
        list(open_video(tmp_path / "plain_cut.mp4"))


def test_corrupted_middle_fails_with_frame_number(tmp_path):
    good = make_video(tmp_path / "good.mp4", n=40, faststart=True)
    data = bytearray(good.read_bytes())
    middle = len(data) // 2
    data[middle:middle + len(data) // 5] = np.random.default_rng(1).integers(0, 256, len(data) // 5,
                                                                             np.uint8).tobytes()
    (tmp_path / "bad.mp4").write_bytes(bytes(data))
    with pytest.raises(VideoError, match=r"bad\.mp4: decod\w+ \w+ at frame \d+"):
        list(open_video(tmp_path / "bad.mp4"))


def test_http_url_streams_like_the_file(clip):
    handler = functools.partial(_QuietHandler, directory=str(clip.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{clip.name}"
        source = open_video(url, fps=5)
        assert source.info.kind == "stream"
        frames = list(source)
    finally:
        server.shutdown()
        server.server_close()
    expected = list(open_video(clip, fps=5))
    assert [f.index for f in frames] == [f.index for f in expected] == list(range(0, N, 2))
    assert all(np.array_equal(a.image, b.image) for a, b in zip(frames, expected))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_cameras_and_unreachable_streams_fail_clearly():
    with pytest.raises(VideoError, match="/dev/video97: cannot open the camera"):
        open_video("/dev/video97")
    if sys.platform.startswith("linux"):  # an int index maps to the v4l2 device path
        with pytest.raises(VideoError, match="/dev/video98: cannot open the camera"):
            open_video(98)
    with pytest.raises(VideoError, match="cannot open the stream"):
        open_video("rtsp://127.0.0.1:9/none", timeout=2)


def test_bad_arguments(clip):
    for kwargs, name in [({"fps": 0}, "fps"), ({"fps": float("nan")}, "fps"), ({"max_frames": 0}, "max_frames"),
                         ({"size": (0, 4)}, "size"), ({"size": "big"}, "size"), ({"image_fps": -1}, "image_fps")]:
        with pytest.raises(ValueError, match=name):
            open_video(clip, **kwargs)
    with pytest.raises(TypeError, match="source"):
        VideoSource(None)
    with pytest.raises(ValueError, match="n must be"):
        next(open_video(clip).chunks(0))
