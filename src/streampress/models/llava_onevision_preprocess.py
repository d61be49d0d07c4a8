"""LLaVA-OneVision input preprocessing without torchvision: frames and prompt pieces.

Prompt: the checkpoint's chat template is rendered once for a user turn holding a video
and a question, and split at the ``<video>`` placeholder into the text that opens a stream
and the question turn (:func:`split_chat_template`); without a template, the original
LLaVA-OneVision ("qwen_1_5") conversation format is used.

Video frames for LLaVA-OneVision are resized to a fixed square (384x384 for the released
checkpoints, ignoring the aspect ratio, no padding or cropping), rescaled by 1/255 and
normalised with the SigLIP mean and std (0.5, 0.5, 0.5). This module reproduces the Hugging
Face video processor (``LlavaOnevisionVideoProcessor``, which needs torchvision) with plain
torch:

- Resize: ``torch.nn.functional.interpolate(mode="bicubic", antialias=True,
  align_corners=False)``, the call torchvision's tensor ``resize`` makes. On the CPU recent torchvision
  feeds uint8 frames straight to that kernel (its uint8 path, which rounds and clamps between
  the two separable passes, like PIL); on other devices it resizes in float32 and then clamps
  and rounds back to uint8. We do the same on each device, so the resized uint8 frames are
  bit-identical to torchvision's. A frame already at the target size is left untouched.
- Rescale and normalise: ``float32(float64(x) / 255)``, then ``(x - mean) / std`` in float32,
  the numerics of Hugging Face's numpy image processor (and of the original LLaVA-OneVision
  code, which runs the SigLIP image processor on each frame). The torchvision path fuses
  the two steps into ``(x - 255 mean) / (255 std)``; the results differ by at most one float32
  ulp (6e-8).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# The original LLaVA-OneVision conversation template ("qwen_1_5"); used when a checkpoint
# ships no chat template and for the random architectures.
DEFAULT_PREFIX = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
DEFAULT_QUESTION = "\n{question}<|im_end|>\n<|im_start|>assistant\n"
_MARK = "\x00QUESTION\x00"

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# Files that may hold the video processor settings of a checkpoint, most specific first.
_PROCESSOR_FILES = (
    "video_preprocessor_config.json",
    os.path.join("video_processor", "preprocessor_config.json"),
    "preprocessor_config.json",
)


@dataclass(frozen=True)
class FramePreprocessor:
    """Turns uint8 RGB frames ``[T, H, W, 3]`` into SigLIP pixel values ``[T, 3, h, w]``.

    Stateless apart from its settings, so one instance can serve any number of streams.
    ``size`` is ``(height, width)`` of the model's input (the vision config's ``image_size``).
    """

    size: tuple[int, int] = (384, 384)
    mean: tuple[float, float, float] = SIGLIP_MEAN
    std: tuple[float, float, float] = SIGLIP_STD
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be (height, width) with positive sides, got {self.size!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std must have 3 entries (std > 0), got {self.mean!r}, {self.std!r}")

    @classmethod
    def from_pretrained(cls, name_or_path: str, image_size: int, **hub_kwargs) -> FramePreprocessor:
        """Reads the checkpoint's video (or image) processor settings; SigLIP defaults if absent.

        ``image_size`` (the vision tower's input side) is the fallback size. Only the JSON
        settings are read, so torchvision is not needed.
        """
        settings = _read_processor_settings(name_or_path, **hub_kwargs)
        size = settings.get("size") or {}
        if "height" in size and "width" in size:
            hw = (int(size["height"]), int(size["width"]))
        elif "shortest_edge" in size:
            hw = (int(size["shortest_edge"]),) * 2
        else:
            hw = (image_size, image_size)
        if hw != (image_size, image_size):
            raise ValueError(
                f"processor size {hw} of {name_or_path!r} differs from the vision tower's image_size {image_size}"
            )
        resample = settings.get("resample", 3)
        if resample not in (3, "bicubic", None):
            raise ValueError(f"only bicubic resampling (3) is supported, {name_or_path!r} asks for {resample!r}")
        return cls(
            size=hw,
            mean=tuple(float(v) for v in settings.get("image_mean", SIGLIP_MEAN)),
            std=tuple(float(v) for v in settings.get("image_std", SIGLIP_STD)),
            rescale_factor=float(settings.get("rescale_factor", 1 / 255)),
        )

    def resize(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[T, 3, H, W]`` -> uint8 ``[T, 3, h, w]``, bit-identical to torchvision's resize."""
        if tuple(frames.shape[-2:]) == tuple(self.size) or frames.shape[0] == 0:
            return frames
        if frames.device.type == "cpu":
            return F.interpolate(frames, size=self.size, mode="bicubic", antialias=True, align_corners=False)
        out = F.interpolate(frames.float(), size=self.size, mode="bicubic", antialias=True, align_corners=False)
        return out.clamp_(0, 255).round_().to(torch.uint8)

    def normalize(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[T, 3, h, w]`` -> float32, ``(x * rescale_factor - mean) / std`` channel-wise."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=frames.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=frames.device).view(1, 3, 1, 1)
        if frames.device.type == "mps":  # no float64 there
            scaled = frames.float() * self.rescale_factor
        else:
            scaled = (frames.double() * self.rescale_factor).float()
        return (scaled - mean) / std

    def __call__(self, frames, device: torch.device | str | None = None) -> torch.Tensor:
        """Frames (uint8 ``[T, H, W, 3]`` array/tensor or a list of ``[H, W, 3]``) -> ``[T, 3, h, w]`` float32.

        Resizing runs where the frames are (the CPU for decoded video) so that only the small
        resized frames travel to ``device``; normalisation runs on ``device``.
        """
        x = as_frame_tensor(frames)
        x = self.resize(x.permute(0, 3, 1, 2).contiguous())
        if device is not None:
            x = x.to(device, non_blocking=True)
        return self.normalize(x)


def as_frame_tensor(frames, name: str = "frames") -> torch.Tensor:
    """Validates frames and returns a uint8 tensor ``[T, H, W, 3]`` (no copy when possible)."""
    if isinstance(frames, (list, tuple)):
        if len(frames) == 0:
            raise ValueError(f"{name} is empty: expected at least one uint8 [H, W, 3] frame")
        items = [as_frame_tensor(f[None] if getattr(f, "ndim", 0) == 3 else f, name) for f in frames]
        shapes = {tuple(t.shape[1:]) for t in items}
        if len(shapes) != 1:
            raise ValueError(f"{name} must all have the same [H, W, 3] shape, got {sorted(shapes)}")
        return torch.cat(items)
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, torch.Tensor):
        raise TypeError(
            f"{name} must be a uint8 numpy array, torch tensor or a list of them, got {type(frames).__name__}"
        )
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{name} must have shape [T, H, W, 3] (RGB, channels last), got {tuple(frames.shape)}")
    if frames.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8 (0-255 RGB), got {frames.dtype}")
    if frames.shape[1] < 1 or frames.shape[2] < 1:
        raise ValueError(f"{name} must have positive height and width, got {tuple(frames.shape)}")
    return frames


def pooled_side(image_size: int, patch_size: int) -> int:
    """Side of the pooled token grid: ceil((image_size // patch_size) / 2), 14 for 384 / 14."""
    return math.ceil((image_size // patch_size) / 2)


def _checkpoint_file(name_or_path: str, filename: str, **hub_kwargs) -> str | None:
    """Path of ``filename`` in a local checkpoint folder or a (cached) hub repo, None if absent."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
    else:
        from transformers.utils import cached_file

        try:
            path = cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False, **hub_kwargs)
        except OSError:
            path = None
    return path if path and os.path.isfile(path) else None


def _read_processor_settings(name_or_path: str, **hub_kwargs) -> dict:
    """The first processor JSON found in a local folder or hub repo (``{}`` when none)."""
    for filename in _PROCESSOR_FILES:
        path = _checkpoint_file(name_or_path, filename, **hub_kwargs)
        if path:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
    return {}


def read_chat_template(name_or_path: str, tokenizer) -> str | None:
    """The checkpoint's chat template: the processor's files first, then the tokenizer's."""
    for filename in ("chat_template.jinja", "chat_template.json"):
        path = _checkpoint_file(name_or_path, filename)
        if path:
            with open(path, encoding="utf-8") as fh:
                return fh.read() if filename.endswith(".jinja") else json.load(fh).get("chat_template")
    return getattr(tokenizer, "chat_template", None)


def split_chat_template(template: str, video_token: str = "<video>") -> tuple[str, str]:
    """Renders one user turn (a video, then a question) with the generation prompt through a
    jinja chat template and splits it at the video placeholder: (prefix, question template
    with ``{question}``)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": _MARK}]}]
    text = render_jinja_template([messages], chat_template=template, add_generation_prompt=True)[0][0]
    if text.count(video_token) != 1 or text.count(_MARK) != 1 or text.index(video_token) > text.index(_MARK):
        raise ValueError(f"the chat template must render one {video_token!r} placeholder before the question, "
                         f"got {text!r}")
    prefix, rest = text.split(video_token)
    return prefix, rest.replace("{", "{{").replace("}", "}}").replace(_MARK, "{question}")
