"""``streampress serve``: live video streams as a service (install with ``streampress[serve]``).

One process holds one model and serves many streams; all model work goes through one
scheduler thread (:mod:`streampress.serve.engine`: fair round-robin between streams,
questions before backlog, a bounded frame queue per stream that keeps the newest frames).

WebSocket ``/v1/realtime`` (OpenAI Realtime API, text and image events)
----------------------------------------------------------------------
One connection is one stream. Authentication as OpenAI's: ``Authorization: Bearer KEY``
(browsers: the subprotocol ``openai-insecure-api-key.KEY``).

Client events supported:

- ``session.update``: ``session.max_output_tokens`` (int or ``"inf"``),
  ``session.instructions`` (kept and echoed; not used by the model),
  ``session.output_modalities`` (``["text"]`` only), and streampress's settings in
  ``session.streampress``: ``method``, ``keep_ratio`` (the token budget), ``params``,
  ``memory`` (any ``--memory`` form: ``full``, ``window:S``, ``retrieval:window=S,top_k=K``,
  ``hermes:budget=N``, ...), ``cacher`` (true /
  object of parameters / null), ``fps``, ``max_new_tokens``. Changing the method, budget,
  params, memory or cacher starts the stream over; fps applies from the next frame. Other
  OpenAI fields (audio, tools, ...) are accepted and ignored. Reply: ``session.updated``.
- ``conversation.item.create`` with a user message whose content parts are ``input_image``
  (``image_url``: a JPEG or PNG ``data:`` URL; streampress adds ``timestamp``: seconds of
  stream time, else the arrival time since the connection opened) or ``input_text`` (the
  question, collected until the next ``response.create``). Reply:
  ``conversation.item.created``, whose item carries ``streampress.frames``: per image its
  stream time and ``queued`` or ``skipped`` (thinned to the session's fps).
- ``response.create``: answers the text items sent since the last response over every frame
  that arrived before it. ``response.max_output_tokens``, ``response.metadata`` (echoed);
  streampress adds ``response.streampress.options`` (multiple choice: the answer's
  ``choice``). ``response.input`` is not supported.
- ``response.cancel`` (optionally with ``response_id``).
- streampress adds ``streampress.watch.create`` {``watch``: {``question``, ``yes_no``,
  ``options``, ``min_interval``, ``max_new_tokens``}} -> ``streampress.watch.created``
  {``watch`` with its ``id``}, and ``streampress.watch.delete`` {``watch_id``} ->
  ``streampress.watch.deleted``: a standing question answered proactively when the scene
  changes (:mod:`streampress.watch`); each new answer arrives as
  ``streampress.watch.answer`` {``watch_id``, ``watch``, ``time``, ``trigger_time``,
  ``text``}, with stream times in seconds.

Server events: ``session.created`` (on connect), ``session.updated``,
``conversation.item.created``, ``response.created``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta``,
``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done``, ``response.done`` and ``error``. ``response.done`` has
``status`` ``completed`` / ``incomplete`` (``max_output_tokens``) / ``cancelled`` /
``failed``, ``usage.output_tokens``, ``usage.input_token_details.image_tokens``, and
streampress's statistics in ``response.streampress``: ``token_ids``,
``time_to_first_token`` (model time), ``first_token_latency`` (from the request, queueing
included), ``seconds``, ``frames``, ``items``, ``visual_tokens`` (kept tokens the question
saw), ``visual_tokens_seen`` / ``visual_tokens_kept`` / ``kept_fraction`` (the stream so
far), ``kv_cache_tokens``, ``stream_time``, ``frames_dropped``, ``frames_skipped``,
``frames_waiting``. Audio events, item retrieval / truncation / deletion, function calls
and ``response.input`` get an ``error`` event (``unsupported_event`` /
``unsupported_value``); the session goes on.

HTTP API
--------
``POST /v1/streams`` (JSON settings as above; ``source`` + ``realtime`` for pull mode with
``--allow-pull``), ``PUT /v1/streams/{id}`` (the same, with an id the client chose: for load
balancers that pin a stream to a server by the id in the path), ``GET /v1/streams``,
``GET|PATCH|DELETE /v1/streams/{id}``,
``POST /v1/streams/{id}/frames`` (multipart field ``frame`` + ``timestamp``, JSON
``{"image_url", "timestamp"}`` or ``{"frames": [...]}``, or a raw ``image/jpeg`` /
``image/png`` body with ``?timestamp=``), ``POST /v1/streams/{id}/ask`` (``question``,
``max_new_tokens``, ``options``, ``stream``: server-sent events with the Realtime
``response.*`` events, ending ``data: [DONE]``; ``stream: false``: one JSON answer),
``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /`` (``static/index.html``).
"""

from __future__ import annotations

from .config import Limits, ServeError, StreamSettings
from .engine import Engine

__all__ = ["Engine", "Limits", "ServeError", "StreamSettings", "create_app", "BackgroundServer", "run"]


def create_app(*args, **kwargs):
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


def __getattr__(name: str):
    if name in ("BackgroundServer", "run"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module 'streampress.serve' has no attribute {name!r}")
