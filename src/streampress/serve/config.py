"""Server limits and per-stream settings, validated the way the command line validates them.

:class:`Limits` are fixed when the server starts (``streampress serve`` options);
:class:`StreamSettings` are per stream: the server's defaults, changed by a ``session.update``
(WebSocket) or the body of ``POST /v1/streams`` (HTTP). Every bad value raises
:class:`ServeError` naming the field, which the protocol layers turn into an ``error``
event or a 4xx JSON error.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .. import spec

__all__ = ["ServeError", "Limits", "StreamSettings"]


class ServeError(Exception):
    """A request the server refuses: ``code`` (machine-readable), ``status`` (HTTP),
    ``param`` (the field at fault), ``type`` (OpenAI error type)."""

    def __init__(self, message: str, code: str = "invalid_value", status: int = 400, param: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.code, self.status, self.param, self.type = message, code, status, param, type

    def as_dict(self, event_id: str | None = None) -> dict:
        error = {"type": self.type, "code": self.code, "message": self.message, "param": self.param}
        if event_id is not None:
            error["event_id"] = event_id
        return error


@dataclass(frozen=True)
class Limits:
    """What one server accepts. ``queue_frames``: frames waiting per stream before the
    oldest waiting one is dropped; ``max_push_rate``: frames a stream may send per second
    of wall-clock time (beyond: a ``rate_limited`` error); ``max_fps``: the highest
    sampling rate a stream may ask for; ``idle_timeout``: seconds without a frame, question
    or update after which a stream is closed and its memory freed."""

    max_sessions: int = 16
    max_frame_bytes: int = 8 * 1024 * 1024
    max_frame_pixels: int = 3840 * 2160
    max_push_rate: float = 60.0
    max_fps: float = 30.0
    max_question_chars: int = 4000
    max_new_tokens: int = 512
    queue_frames: int = 32
    max_watches: int = 8
    idle_timeout: float = 300.0

    def public(self) -> dict:
        return asdict(self)


def _fail(param: str, message: str):
    raise ServeError(f"{param}: {message}", param=param)


@dataclass(frozen=True)
class StreamSettings:
    """How one stream is processed. ``method`` / ``keep_ratio`` (the token budget) /
    ``params``: the pruner (``none``: keep every token); ``memory``: any ``--memory`` form
    (``full``, ``window:SECONDS``, ``retrieval:window=S,top_k=K``, ``infinipot:budget=N``,
    ``hermes:budget=N``, with their options, :mod:`streampress.spec`); ``cacher``: STC-Cacher parameters
    (None: off); ``fps``: frames kept per second of stream time (the first frame at or
    after each tick k/fps); ``max_new_tokens``: default answer length."""

    method: str = "none"
    keep_ratio: float | None = None
    params: dict = field(default_factory=dict)
    memory: str = "full"
    cacher: dict | None = None
    fps: float = 1.0
    max_new_tokens: int = 32

    # fields that define the stream: changing one starts the stream over
    STREAM_FIELDS = ("method", "keep_ratio", "params", "memory", "cacher")

    def public(self) -> dict:
        return {"method": self.method, "keep_ratio": self.keep_ratio, "params": dict(self.params),
                "memory": self.memory, "cacher": None if self.cacher is None else dict(self.cacher),
                "fps": self.fps, "max_new_tokens": self.max_new_tokens}

    def defines_same_stream(self, other: StreamSettings) -> bool:
        return all(getattr(self, k) == getattr(other, k) for k in self.STREAM_FIELDS)

    def updated(self, patch: Any, limits: Limits, prefix: str = "") -> StreamSettings:
        """These settings with ``patch`` (a dict of the fields above) applied and checked."""
        if not isinstance(patch, dict):
            _fail(prefix.rstrip(".") or "settings", f"expected an object, got {type(patch).__name__}")
        unknown = sorted(set(patch) - {f for f in self.__dataclass_fields__})
        if unknown:
            _fail(prefix + unknown[0], f"unknown setting; expected one of "
                                       f"{', '.join(self.__dataclass_fields__)}")
        changes: dict[str, Any] = {}
        for key, value in patch.items():
            name = prefix + key
            if key == "method":
                if not isinstance(value, str) or not value.strip():
                    _fail(name, f"expected a method name (or none), got {value!r}")
                changes[key] = _method(value, name)
            elif key == "keep_ratio":
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                          or not 0 < value <= 1 or not math.isfinite(value)):
                    _fail(name, f"expected a number in (0, 1] or null, got {value!r}")
                changes[key] = None if value is None else float(value)
            elif key == "params":
                if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                    _fail(name, f"expected an object of the method's parameters, got {value!r}")
                changes[key] = dict(value)
            elif key == "memory":
                if not isinstance(value, str):
                    _fail(name, f"expected a string such as full or window:30, got {value!r}")
                changes[key] = spec.memory_text(parse_memory(value, name))
            elif key == "cacher":
                if value is None or value is False:
                    changes[key] = None
                elif value is True or isinstance(value, dict):
                    given = {} if value is True else value
                    known = _cacher_defaults()
                    bad = sorted(set(given) - set(known))
                    if bad:
                        _fail(name, f"unknown cacher parameter {bad[0]!r}; expected {', '.join(known)}")
                    changes[key] = {**{k: v for k, v in known.items() if v is not None}, **given}
                else:
                    _fail(name, f"expected true, false, null or an object of cacher parameters, got {value!r}")
            elif key == "fps":
                if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                        or not 0 < value <= limits.max_fps):
                    _fail(name, f"expected a number in (0, {limits.max_fps:g}], got {value!r}")
                changes[key] = float(value)
            elif key == "max_new_tokens":
                changes[key] = check_max_new_tokens(value, limits, name)
        if "method" in changes and changes["method"] != self.method:
            # parameters belong to a method; a stream without pruning has no budget
            changes.setdefault("params", {})
            if changes["method"] == "none":
                changes.setdefault("keep_ratio", None)
        result = replace(self, **changes)
        result.check_method(prefix)
        return result

    def check_method(self, prefix: str = "") -> None:
        """Build the pruner and cacher once (cheap): they check their own parameters."""
        if self.method == "none":
            if self.keep_ratio is not None or self.params:
                _fail(prefix + "keep_ratio", "keep_ratio and params need a method")
        else:
            try:
                self.make_pruner()
            except (TypeError, ValueError) as exc:
                _fail(prefix + "params", f"method {self.method}: {exc}")
        if self.cacher is not None:
            try:
                self.make_cacher()
            except (TypeError, ValueError) as exc:
                _fail(prefix + "cacher", str(exc))

    def make_pruner(self):
        if self.method == "none":
            return None
        from streampress import create_pruner

        params = dict(self.params)
        if self.keep_ratio is not None:
            params["keep_ratio"] = self.keep_ratio
        return create_pruner(self.method, **params)

    def make_cacher(self):
        if self.cacher is None:
            return None
        from streampress import create_cacher

        return create_cacher(**self.cacher)

    def make_memory(self):
        return spec.memory_policy(parse_memory(self.memory))


def _method(text: str, param: str = "method") -> str:
    """A registered pruning method's canonical name, or ``none`` (also ``dense``)."""
    name = text.strip()
    if name.lower() in ("none", "dense"):
        return "none"
    from streampress.pruners.registry import resolve_name

    try:
        return resolve_name(name).name
    except ValueError as exc:
        _fail(param, str(exc))


def parse_memory(text: str, param: str = "memory") -> dict | None:
    """A memory spec (:func:`streampress.spec.parse_memory`), errors as :class:`ServeError` on ``param``."""
    try:
        return spec.parse_memory(text)
    except ValueError as exc:
        _fail(param, str(exc))


def _cacher_defaults() -> dict:
    """The parameters of :func:`streampress.create_cacher` with their defaults."""
    import inspect

    from streampress import create_cacher

    return {name: p.default for name, p in inspect.signature(create_cacher).parameters.items()}


def check_max_new_tokens(value, limits: Limits, name: str = "max_new_tokens") -> int:
    """An answer length: an int in [1, limits.max_new_tokens], or ``"inf"`` (the limit)."""
    if value == "inf":
        return limits.max_new_tokens
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limits.max_new_tokens:
        _fail(name, f"expected an integer in [1, {limits.max_new_tokens}] or \"inf\", got {value!r}")
    return int(value)
