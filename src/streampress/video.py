"""Video sources: files, folders of images, live streams and cameras, with fps resampling.

Everything a streaming session sees starts here. A :class:`VideoSource` decodes frames one at a
time (never the whole video at once) and yields :class:`Frame` objects in presentation order with
real timestamps in seconds from the start of the stream.

- Files are decoded with PyAV (FFmpeg), sequentially, with the container's own timestamps.
- A folder of images is read in natural name order (``img2`` before ``img10``); image ``i`` is at
  ``i / image_fps`` seconds.
- A URL (``rtsp://``, ``http(s)://``, ``udp://``, ...) or a camera (``/dev/video0`` or an int
  index) is opened live through PyAV; timestamps count from the first frame received.

Resampling to ``fps`` keeps, for every tick ``k / fps`` (k = 0, 1, 2, ...), the first frame whose
timestamp is at or after that tick, and never repeats a frame. Ticks are computed from their index,
not by accumulating a step, so long videos do not drift.

Every failure is a :class:`VideoError` (a ``ValueError``) whose message names the source and,
for decoding failures, the frame number where decoding stopped.
"""

from __future__ import annotations

import math
import re
import sys
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Frame", "FrameBuffer", "VideoError", "VideoInfo", "VideoSource", "open_video", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
# A container may announce a frame count a frame or two above what decodes (edit lists, a
# dropped priming frame); more missing frames than this means the file was cut short.
_MISSING_FRAMES_TOLERATED = 2
_TICK_EPS = 1e-6  # in units of ticks: absorbs float error such as 0.3 * 10 == 2.9999999999999996


class VideoError(ValueError):
    """A video source could not be opened or decoded; the message says which and why."""


class Frame(NamedTuple):
    """One decoded frame.

    ``image`` is ``uint8 [H, W, 3]`` RGB; ``timestamp`` is seconds from the start of the stream;
    ``index`` is the frame's number in the source (before resampling), counted from 0.
    """

    image: np.ndarray
    timestamp: float
    index: int


class VideoInfo(NamedTuple):
    """What is known about a source before decoding it (``None`` where the source does not say).

    ``width`` / ``height`` are those of the frames the source yields (after ``size``);
    ``fps``, ``duration`` and ``frame_count`` describe the source itself, before resampling.
    """

    source: str
    kind: str  # "file", "folder", "stream" or "camera"
    width: int | None
    height: int | None
    fps: float | None
    duration: float | None
    frame_count: int | None


def open_video(
    source: str | Path | int,
    fps: float | None = None,
    max_frames: int | None = None,
    size: int | tuple[int, int] | None = None,
    *,
    image_fps: float | None = None,
    format: str | None = None,
    options: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> VideoSource:
    """Open a video file, image folder, stream URL or camera; see :class:`VideoSource`."""
    return VideoSource(source, fps=fps, max_frames=max_frames, size=size, image_fps=image_fps,
                       format=format, options=options, timeout=timeout)


class _Ticker:
    """Keeps the first frame at or after each tick ``k / fps``; ``fps=None`` keeps every frame."""

    def __init__(self, fps: float | None):
        self.fps = fps
        self.next_tick = 0

    def take(self, t: float) -> bool:
        if self.fps is None:
            return True
        position = t * self.fps
        if position + _TICK_EPS < self.next_tick:
            return False
        # Skip every tick this frame already covers, so a frame is never repeated.
        self.next_tick = math.floor(position + _TICK_EPS) + 1
        return True


class FrameBuffer:
    """Collects frames and hands them out as ``(images uint8 [k, H, W, 3], timestamps)`` batches.

    The one chunking mechanism of the package: :meth:`VideoSource.chunks`, ``streampress run``
    and the evaluation harness all feed sessions through it. :meth:`push` says when ``n``
    frames are waiting; :meth:`pop` takes whatever is waiting (``None`` when nothing is).
    """

    def __init__(self, n: int):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        self.n = n
        self._images: list[np.ndarray] = []
        self._times: list[float] = []

    def push(self, image: np.ndarray, timestamp: float) -> bool:
        """Add one frame; True when a full batch of ``n`` frames is waiting."""
        self._images.append(image)
        self._times.append(timestamp)
        return len(self._images) >= self.n

    def pop(self) -> tuple[np.ndarray, list[float]] | None:
        """The waiting frames as one batch (and an empty buffer), or ``None`` when there are none."""
        if not self._images:
            return None
        batch = np.stack(self._images), self._times
        self._images, self._times = [], []
        return batch


def _positive_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1


def _check_positive_number(name: str, value) -> None:
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number or None, got {value!r}")


def _check_size(size) -> int | tuple[int, int] | None:
    if size is None:
        return None
    if _positive_int(size):
        return int(size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(_positive_int(v) for v in size):
        return int(size[0]), int(size[1])
    raise ValueError(f"size must be a positive int (the longer side) or (width, height), got {size!r}")


def _output_size(size, width: int | None, height: int | None) -> tuple[int | None, int | None]:
    """Size of the yielded frames: ``size`` itself, or the source's size scaled to a longer side."""
    if size is None:
        return width, height
    if isinstance(size, tuple):
        return size
    if width is None or height is None:
        return None, None  # known once the first frame is decoded
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _natural_key(path: Path):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


class VideoSource:
    """An iterable of :class:`Frame` from one source, decoded lazily.

    Args:
        source: a file path, a folder of images, a stream URL, a camera device path such as
            ``/dev/video0``, or a camera index (int).
        fps: resample to this many frames per second using the real timestamps (``None``: every frame).
        max_frames: stop after yielding this many frames.
        size: ``(width, height)`` of the yielded frames, or an int giving the longer side (aspect kept);
            ``None`` keeps the source's size.
        image_fps: rate at which a folder's images were taken (default: ``fps``, else 1.0).
        format: FFmpeg input format to force (e.g. ``"v4l2"``, ``"dshow"``); cameras get one by default.
        options: FFmpeg options passed to ``av.open`` (e.g. ``{"video_size": "640x480"}``).
        timeout: seconds to wait when opening or reading a live source.

    A file or folder can be iterated several times; each iteration starts from the beginning.
    """

    def __init__(self, source, *, fps=None, max_frames=None, size=None, image_fps=None,
                 format=None, options=None, timeout=10.0):
        _check_positive_number("fps", fps)
        if max_frames is not None and (not isinstance(max_frames, int) or isinstance(max_frames, bool)
                                       or max_frames < 1):
            raise ValueError(f"max_frames must be a positive int or None, got {max_frames!r}")
        _check_positive_number("image_fps", image_fps)
        self.fps = float(fps) if fps is not None else None
        self.max_frames = max_frames
        self.size = _check_size(size)
        self._format = format
        self._options = dict(options or {})
        self._timeout = timeout
        self._container = None  # opened by the constructor, handed to the first iteration
        self._iterators: weakref.WeakSet = weakref.WeakSet()
        self._images: list[Path] = []
        self.kind, self._target = self._classify(source)
        if self.kind == "folder":
            self._image_fps = float(image_fps or fps or 1.0)
            self.info = self._probe_folder()
        else:
            self.info = self._probe_av()

    # ---------------------------------------------------------------- opening
    def _classify(self, source) -> tuple[str, str]:
        if isinstance(source, bool) or not isinstance(source, (str, Path, int)):
            raise TypeError(f"source must be a path, URL or camera index, got {type(source).__name__}")
        if isinstance(source, int):
            if sys.platform.startswith("linux"):
                self._format = self._format or "v4l2"
                return "camera", f"/dev/video{source}"
            if sys.platform == "darwin":
                self._format = self._format or "avfoundation"
                return "camera", str(source)
            raise VideoError(f"camera index {source}: on this platform, pass the device name and "
                             "format (e.g. source='video=My Camera', format='dshow')")
        text = str(source)
        if _URL.match(text):
            if text.lower().startswith("rtsp") and "rtsp_transport" not in self._options:
                self._options["rtsp_transport"] = "tcp"  # UDP loses packets on most networks
            return "stream", text
        if text.startswith("/dev/video"):
            self._format = self._format or "v4l2"
            return "camera", text
        path = Path(text)
        if self._format is not None and not path.exists():  # a device named for a given input format
            return "camera", text
        if not path.exists():
            raise VideoError(f"{text}: no such file or folder")
        if path.is_dir():
            return "folder", text
        if path.stat().st_size == 0:
            raise VideoError(f"{text}: the file is empty")
        return "file", text

    def _open(self):
        import av

        kwargs: dict[str, Any] = {"options": self._options}
        if self._format:
            kwargs["format"] = self._format
        if self.kind != "file":
            kwargs["timeout"] = self._timeout
        try:
            container = av.open(self._target, **kwargs)
        except Exception as exc:  # FFmpeg errors and PyAV's own failures on broken headers
            what = {"file": "not a readable video file (corrupt or not a video)",
                    "stream": "cannot open the stream", "camera": "cannot open the camera"}[self.kind]
            raise VideoError(f"{self._target}: {what}: {exc}") from None
        if not container.streams.video:
            found = ", ".join(sorted({s.type for s in container.streams})) or "none"
            fmt = container.format.name
            container.close()
            raise VideoError(f"{self._target}: no video stream (read as format {fmt!r}, streams: {found}); "
                             "not a video file, or the file is corrupt")
        return container

    def _probe_av(self) -> VideoInfo:
        container = self._open()
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        width, height = _output_size(self.size, stream.width or None, stream.height or None)
        self._container = container
        return VideoInfo(self._target, self.kind, width, height, float(rate) if rate else None,
                         duration, stream.frames or None)

    def _probe_folder(self) -> VideoInfo:
        from PIL import Image

        folder = Path(self._target)
        self._images = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
                               and p.is_file()), key=_natural_key)
        if not self._images:
            raise VideoError(f"{self._target}: the folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
        try:
            with Image.open(self._images[0]) as first:
                width, height = first.size
        except Exception as exc:
            raise VideoError(f"{self._images[0]}: cannot read image 0: {exc}") from None
        width, height = _output_size(self.size, width, height)
        n = len(self._images)
        return VideoInfo(self._target, "folder", width, height, self._image_fps, n / self._image_fps, n)

    # ---------------------------------------------------------------- reading
    @property
    def live(self) -> bool:
        """True for streams and cameras: frames arrive in real time and the length is unknown."""
        return self.kind in ("stream", "camera") and self.info.duration is None

    def estimated_frames(self) -> int | None:
        """How many frames iteration should yield (``None`` when the source does not say)."""
        count = self.info.frame_count
        if self.fps is not None and self.info.duration is not None:
            # The last frame starts one frame interval before the end of the duration.
            last = self.info.duration - (1.0 / self.info.fps if self.info.fps else 0.0)
            by_time = math.floor(max(last, 0.0) * self.fps + _TICK_EPS) + 1
            count = min(count, by_time) if count else by_time
        if self.max_frames is not None:
            count = min(count, self.max_frames) if count else self.max_frames
        return count

    def __iter__(self) -> Iterator[Frame]:
        iterator = self._iter_folder() if self.kind == "folder" else self._iter_av()
        self._iterators.add(iterator)  # so that close() can stop decoding mid-stream
        return iterator

    def chunks(self, n: int) -> Iterator[tuple[np.ndarray, list[float]]]:
        """Yield ``(images uint8 [k, H, W, 3], timestamps)`` with ``k == n`` except maybe the last."""
        buffer = FrameBuffer(n)
        for frame in self:
            if buffer.push(frame.image, frame.timestamp):
                yield buffer.pop()
        last = buffer.pop()
        if last is not None:
            yield last

    def _convert(self, frame) -> np.ndarray:
        width, height = self.info.width, self.info.height
        if width is None or height is None:
            width, height = _output_size(self.size, frame.width, frame.height)
        if self.size is None or (frame.width, frame.height) == (width, height):
            return frame.to_ndarray(format="rgb24")
        return frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="AREA")

    def _iter_av(self) -> Iterator[Frame]:
        import av

        container, self._container = self._container, None
        if container is None:
            container = self._open()
        stream = container.streams.video[0]
        live = self.live
        if not live:
            stream.thread_type = "AUTO"  # frame threading: faster, adds latency only
        step = 1.0 / self.info.fps if self.info.fps else 0.0
        origin = None
        if not live and stream.start_time is not None and stream.time_base is not None:
            origin = float(stream.start_time * stream.time_base)
        ticker, index, emitted, last = _Ticker(self.fps), 0, 0, 0.0
        clock_start = time.monotonic()
        try:
            for frame in container.decode(stream):
                t = frame.time
                if t is None:  # no pts: extrapolate (files) or use the arrival time (live)
                    t_rel = time.monotonic() - clock_start if live else (last + step if index else 0.0)
                else:
                    if origin is None:
                        origin = t
                    t_rel = t - origin
                t_rel = max(float(t_rel), last if index else 0.0)  # never backwards
                last = t_rel
                if ticker.take(t_rel):
                    yield Frame(self._convert(frame), t_rel, index)
                    emitted += 1
                    if self.max_frames is not None and emitted >= self.max_frames:
                        return
                index += 1
        except av.FFmpegError as exc:
            after = f" (after {last:.2f} s of video)" if index else ""
            raise VideoError(f"{self._target}: decoding failed at frame {index}{after}: {exc}") from None
        finally:
            container.close()
        expected = self.info.frame_count
        if self.kind == "file" and expected and index < expected - _MISSING_FRAMES_TOLERATED:
            raise VideoError(f"{self._target}: decoding stopped at frame {index} of {expected} "
                             f"(after {last:.2f} s of video): the file is truncated or corrupt")

    def _iter_folder(self) -> Iterator[Frame]:
        from PIL import Image

        ticker, emitted = _Ticker(self.fps), 0
        expected = (self.info.width, self.info.height)
        for index, path in enumerate(self._images):
            t = index / self._image_fps
            if not ticker.take(t):
                continue
            try:
                with Image.open(path) as img:
                    img = img.convert("RGB")
                    if self.size is not None:
                        img = img.resize(expected, Image.BICUBIC)
                    elif img.size != expected:
                        raise VideoError(f"{path}: image {index} is {img.size[0]}x{img.size[1]}, the first "
                                         f"is {expected[0]}x{expected[1]}; pass size= to resize all images")
                    image = np.asarray(img, dtype=np.uint8)
            except VideoError:
                raise
            except Exception as exc:
                raise VideoError(f"{path}: cannot read image {index}: {exc}") from None
            yield Frame(image, t, index)
            emitted += 1
            if self.max_frames is not None and emitted >= self.max_frames:
                return

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Release the source: stop running iterations and close their decoders."""
        for iterator in list(self._iterators):
            iterator.close()
        if self._container is not None:
            self._container.close()
            self._container = None

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        i = self.info
        return (f"VideoSource({i.source!r}, kind={i.kind}, size={i.width}x{i.height}, fps={i.fps}, "
                f"duration={i.duration}, frames={i.frame_count}, resample_fps={self.fps})")
