"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL video preprocessing without torchvision.

Mirrors the Hugging Face Qwen video processors step by step:

1. smart resize: each side to a multiple of ``patch_size * merge_size`` (28 for Qwen2/2.5,
   32 for Qwen3), aspect ratio kept, pixel count within ``[min_pixels, max_pixels]``.
   Qwen2/2.5 count pixels per frame; Qwen3-VL counts them over a temporal patch (its
   processor counts over the clip; a stream has no clip length, so the unit is the item).
2. bicubic resize with antialiasing, as torchvision's tensor resize does it: on CPU the
   native uint8 kernel, elsewhere float -> clamp -> round -> uint8. Skipped when the frame
   already has the target size.
3. rescale and normalise, fused like the HF torch backend: ``(x - mean/r) / (std/r)``.
4. patchify into ``pixel_values_videos [T*gh*gw, C*tp*p*p]`` in the processor's order
   (t, gh/m, gw/m, m, m | C, tp, p, p) and ``video_grid_thw [[T, gh, gw]]``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class QwenVisionParams:
    """Preprocessing parameters of one Qwen checkpoint (see :meth:`from_checkpoint`)."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    mean: tuple = OPENAI_CLIP_MEAN
    std: tuple = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    pixels_per_item: bool = False  # Qwen3-VL: min/max pixels count over a temporal patch

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @staticmethod
    def defaults(model_type: str) -> QwenVisionParams:
        if model_type == "qwen3_vl":
            return QwenVisionParams(patch_size=16, min_pixels=128 * 32 * 32, max_pixels=768 * 32 * 32,
                                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), pixels_per_item=True)
        return QwenVisionParams()

    @staticmethod
    def from_dict(cfg: dict, model_type: str) -> QwenVisionParams:
        """Read a (video_)preprocessor_config.json dict; missing fields keep the family's defaults."""
        base = QwenVisionParams.defaults(model_type)
        size = cfg.get("size") or {}
        min_pixels = cfg.get("min_pixels", size.get("shortest_edge", base.min_pixels))
        max_pixels = cfg.get("max_pixels", size.get("longest_edge", base.max_pixels))
        return QwenVisionParams(
            patch_size=int(cfg.get("patch_size", base.patch_size)),
            merge_size=int(cfg.get("merge_size", base.merge_size)),
            temporal_patch_size=int(cfg.get("temporal_patch_size", base.temporal_patch_size)),
            min_pixels=int(min_pixels), max_pixels=int(max_pixels),
            mean=tuple(float(v) for v in cfg.get("image_mean", base.mean)),
            std=tuple(float(v) for v in cfg.get("image_std", base.std)),
            rescale_factor=float(cfg.get("rescale_factor", base.rescale_factor)),
            pixels_per_item=base.pixels_per_item)

    @staticmethod
    def from_checkpoint(name_or_path: str, model_type: str) -> QwenVisionParams:
        """The checkpoint's video preprocessor config (else its image one), else defaults."""
        for fname in ("video_preprocessor_config.json", "preprocessor_config.json"):
            path = os.path.join(name_or_path, fname)
            if not os.path.isdir(name_or_path):
                try:
                    from huggingface_hub import hf_hub_download

                    path = hf_hub_download(name_or_path, fname)
                except Exception:  # file absent from the repo, or offline
                    continue
            if os.path.isfile(path):
                with open(path) as f:
                    return QwenVisionParams.from_dict(json.load(f), model_type)
        return QwenVisionParams.defaults(model_type)


def smart_resize(height: int, width: int, params: QwenVisionParams) -> tuple[int, int]:
    """Target (height, width): multiples of ``params.factor`` within the pixel budget."""
    factor = params.factor
    if min(height, width) < 1:
        raise ValueError(f"frames must be at least 1x1 pixels, got {height}x{width}")
    frames = params.temporal_patch_size if params.pixels_per_item else 1
    if params.pixels_per_item and (height < factor or width < factor):
        # Qwen3-VL scales frames smaller than one merged patch up first.
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"frames must have an aspect ratio below 200, got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if frames * h_bar * w_bar > params.max_pixels:
        beta = math.sqrt(frames * height * width / params.max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif frames * h_bar * w_bar < params.min_pixels:
        beta = math.sqrt(params.min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    h_bar, w_bar = max(factor, h_bar), max(factor, w_bar)
    return h_bar, w_bar


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[F, 3, H, W]`` -> uint8 ``[F, 3, h, w]``, bicubic with antialiasing."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    if frames.device.type == "cpu":
        return F.interpolate(frames, size=size, mode="bicubic", antialias=True, align_corners=False)
    out = F.interpolate(frames.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return out.clamp_(0, 255).round_().to(torch.uint8)


def normalize(frames: torch.Tensor, params: QwenVisionParams) -> torch.Tensor:
    """uint8 ``[F, 3, H, W]`` -> float32, ``(x - mean/r) / (std/r)`` (the fused HF form)."""
    inv = 1.0 / params.rescale_factor
    mean = (torch.tensor(params.mean, dtype=torch.float32, device=frames.device) * inv).view(1, -1, 1, 1)
    std = (torch.tensor(params.std, dtype=torch.float32, device=frames.device) * inv).view(1, -1, 1, 1)
    return (frames.to(torch.float32) - mean) / std


def patchify(frames: torch.Tensor, params: QwenVisionParams) -> tuple[torch.Tensor, torch.Tensor]:
    """float ``[F, C, H, W]`` (F a multiple of the temporal patch) -> (pixel_values, grid_thw)."""
    num_frames, channels, height, width = frames.shape
    tp, p, m = params.temporal_patch_size, params.patch_size, params.merge_size
    if num_frames % tp or height % (p * m) or width % (p * m):
        raise ValueError(f"patchify needs frames in multiples of {tp} and sides in multiples of {p * m}, "
                         f"got {tuple(frames.shape)}")
    gt, gh, gw = num_frames // tp, height // p, width // p
    x = frames.reshape(gt, tp, channels, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = x.reshape(gt * gh * gw, channels * tp * p * p)
    grid_thw = torch.tensor([[gt, gh, gw]], dtype=torch.long)
    return pixel_values, grid_thw


def preprocess_frames(frames: torch.Tensor, params: QwenVisionParams,
                      size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """uint8 ``[F, H, W, 3]`` -> ``(pixel_values_videos, video_grid_thw, (h, w))``.

    ``size`` forces the target size (it must be a multiple of the patch factor); default:
    :func:`smart_resize` of the input size.
    """
    if size is None:
        size = smart_resize(int(frames.shape[1]), int(frames.shape[2]), params)
    chw = frames.permute(0, 3, 1, 2)
    pixel_values, grid_thw = patchify(normalize(resize_frames(chw.contiguous(), size), params), params)
    return pixel_values, grid_thw, tuple(size)
