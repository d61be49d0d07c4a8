"""CUDA variants: the pruners, a streaming session, the STC-Cacher and retrieval memory on the
accelerator against their CPU float32 results (``pytest -m gpu``; skipped without CUDA).

``STREAMPRESS_GPU_TEST_DEVICE`` (default ``cuda``) names the device under test. The GPU
suite's CPU rehearsal (``benchmarks/gpu_suite.py --rehearse``) sets it to ``cpu`` so that
every comparison below runs, CPU against CPU, before a device minute is spent on it.

Stated tolerances:

- Pruners (fp16 / bf16 grids on the device vs the same rounded values as float32 on the CPU;
  the pruners score in float32 on both): the masks are equal, or every differing position is
  a tie: its CPU score lies within ``SCORE_TIE`` (absolute, scores are cosines in [-1, 1]) of
  the threshold (threshold mode) or of the score of a token the CPU decided the other way
  (budget modes). DivPrune is a greedy selection (one tie changes every later pick), so it may
  differ in at most ``DIVPRUNE_MAX_DIFF`` of a grid's tokens. After a differing grid the
  device pruner is re-synchronised to the CPU pruner's state. Differing counts are reported
  as junit properties (``record_property``).
- Sessions in float32 on the device (TF32 off) vs float32 on the CPU, same weights: kept
  tokens and KV lengths equal, question logits and KV cache within ``FP32_REL`` relative
  (``|a - b| / |b|``). In bfloat16 on the device: logits within ``BF16_REL`` of the float32
  CPU logits.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import streampress
from _pruner_helpers import stream
from streampress.pruners.base import ScorePruner

DEVICE = os.environ.get("STREAMPRESS_GPU_TEST_DEVICE", "cuda")
SCORE_TIE = 1e-4
DIVPRUNE_MAX_DIFF = 0.1
FP32_REL = 1e-3
BF16_REL = 5e-2


def _device_available() -> bool:
    if torch.device(DEVICE).type == "cuda":
        return torch.cuda.is_available()
    return True


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _device_available(), reason=f"{DEVICE}: CUDA is not available")]

# Every registered method at its defaults, plus the matched-budget mode of the threshold methods.
PRUNER_CASES = [(name, {}) for name in streampress.list_pruners()] + [
    ("dtd", {"keep_ratio": 0.25}), ("mssavt", {"keep_ratio": 0.75}),
    ("streaming_assistant", {"keep_ratio": 0.25}), ("stc", {"keep_ratio": 0.25}),
]


@pytest.fixture(autouse=True)
def _exact_fp32():
    """No TF32 in float32 matrix products and convolutions (the CPU has none)."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def to_device(obj, device):
    """A copy of a pruner snapshot (tensors, tuples, NamedTuples, lists, dicts) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, copy=True)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def explained_by_ties(pruner, snapshot, x, keep, diff) -> tuple[bool, float]:
    """Whether every position in ``diff [1, H, W]`` is a tie of the CPU scores; the largest gap."""
    if not isinstance(pruner, ScorePruner):
        frac = float(diff.float().mean())
        return frac <= DIVPRUNE_MAX_DIFF, frac
    scores, _ = pruner.score(pruner._validated(x), snapshot[2])
    s, k, d = scores.flatten(), keep.flatten(), diff.flatten()
    if bool(torch.isneginf(s[d]).any()):
        return False, float("inf")  # a structural keep may never differ
    if pruner.threshold is not None:
        gaps = (s[d] - pruner.threshold).abs()
    else:
        gaps = torch.stack([(s[~k & ~torch.isneginf(s)] - v).abs().min() if bool(k[i]) else
                            (s[k & ~torch.isneginf(s)] - v).abs().min() for i, v in zip(d.nonzero()[:, 0], s[d])])
    worst = float(gaps.max())
    return worst <= SCORE_TIE, worst


SHAPES = [(16, 16, 128), (16, 16, 3584)]  # full width only for the methods with a speed target
PRUNER_PARAMS = [(name, params, shape) for name, params in PRUNER_CASES for shape in SHAPES
                 if shape[-1] < 3584 or name in ("streaming_assistant", "stc")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name,params,shape", PRUNER_PARAMS,
                         ids=[n + "".join(f"-{k}={v}" for k, v in p.items()) + "-" + "x".join(map(str, s))
                              for n, p, s in PRUNER_PARAMS])
def test_pruner_masks_match_cpu(name, params, shape, dtype, record_property):
    h, w, d = shape
    x = stream(6, H=h, W=w, D=d, seed=1).to(dtype)  # the rounded values, on both devices
    ref, on_device = x.float(), x.to(DEVICE)
    cpu = streampress.create_pruner(name, **params)
    dev = streampress.create_pruner(name, **params)
    differing, worst = 0, 0.0
    for t in range(x.shape[0]):
        snap = cpu.snapshot()
        keep = cpu(ref[t:t + 1])
        got = dev(on_device[t:t + 1])
        assert got.dtype == torch.bool and got.shape == keep.shape and got.device.type == torch.device(DEVICE).type
        diff = keep != got.cpu()
        if bool(diff.any()):
            ok, gap = explained_by_ties(cpu, snap, ref[t:t + 1], keep, diff)
            differing += int(diff.sum())
            worst = max(worst, gap)
            assert ok, f"grid {t}: {int(diff.sum())} positions differ and are not ties (largest gap {gap:.3g})"
            dev.restore(to_device(cpu.snapshot(), DEVICE))
    record_property("differing_positions", differing)
    record_property("largest_tie_gap", worst)


# ---------------------------------------------------------------- sessions on tiny models
ARCH = "random:qwen2.5-vl-tiny"
QUESTION = "What happens in the video?"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _pair(dtype: str):
    """The tiny model on the CPU in float32 and on the device in ``dtype``, same weights."""
    cpu = streampress.load_model(ARCH, dtype="float32", device="cpu")
    dev = streampress.load_model(ARCH, dtype=dtype, device=DEVICE)
    dev.hf_model.load_state_dict(cpu.hf_model.state_dict())
    return cpu, dev


def _frames(model, count: int = 8, seed: int = 0) -> np.ndarray:
    side = 2 * model.params.factor  # a 2x2 merged grid per temporal patch
    return np.random.default_rng(seed).integers(0, 256, size=(count, side, side, 3), dtype=np.uint8)


def _configs():
    from streampress import BudgetMemory, RetrievalMemory

    return {
        "dense": lambda: {},
        "pruned": lambda: {"pruner": streampress.create_pruner("streaming_assistant", keep_ratio=0.5)},
        "cacher": lambda: {"cacher": streampress.create_cacher(rho=0.5, interval=2)},
        "retrieval": lambda: {"memory": RetrievalMemory(window_seconds=1.0, top_k=1)},
        # token budgets: per-layer (and per-head) gathers, the guidance forward, the summary
        # token's rotation and position re-indexing on the device
        "infinipot": lambda: {"memory": BudgetMemory("infinipot_v", budget=16, reindex="eager", pooling="code")},
        "hermes": lambda: {"memory": BudgetMemory("hermes", budget=10, reindex="eager")},
    }


def _run(model, kind: str, frames: np.ndarray):
    from streampress.session import StreamingSession

    session = StreamingSession(model, **_configs()[kind]())
    times = np.arange(len(frames)) / 2.0
    for i in range(0, len(frames), 2):  # one temporal patch per call, as a stream delivers them
        session.add_frames(frames[i:i + 2], times[i:i + 2])
    return session


@pytest.mark.parametrize("kind", ["dense", "pruned", "cacher", "retrieval", "infinipot", "hermes"])
def test_session_fp32_matches_cpu(kind, record_property):
    cpu_model, dev_model = _pair("float32")
    frames = _frames(cpu_model, count=16 if kind in ("infinipot", "hermes") else 8)
    a, b = _run(cpu_model, kind, frames), _run(dev_model, kind, frames)
    sa, sb = a.stats(), b.stats()
    for key in ("items", "visual_tokens_kept", "kv_cache_tokens"):
        assert sa[key] == sb[key], key
    if kind in ("infinipot", "hermes"):  # the same tokens kept in every layer and head, same positions
        assert sa["compressions"] >= 2 and sa["reindexes"] == sa["compressions"] == sb["compressions"]
        ta, tb = a.memory.table, b.memory.table
        for name in ("item", "raster", "pos"):
            assert torch.equal(getattr(tb, name).cpu(), getattr(ta, name)), name
        assert a.position_state == b.position_state
    la, lb = a.question_logits(QUESTION), b.question_logits(QUESTION)
    assert bool(torch.isfinite(lb).all())
    err = _rel(lb, la)
    record_property("logits_rel_err", err)
    assert err <= FP32_REL, f"{kind}: logits differ by {err:.3g} relative"
    cache_a = [(l.keys, l.values) for l in a.memory.cache.layers if l.keys is not None]
    cache_b = [(l.keys, l.values) for l in b.memory.cache.layers if l.keys is not None]
    assert len(cache_a) == len(cache_b)
    for (ka, va), (kb, vb) in zip(cache_a, cache_b):
        assert kb.shape == ka.shape and vb.shape == va.shape
        assert _rel(kb, ka) <= FP32_REL and _rel(vb, va) <= FP32_REL
    answer_a, answer_b = a.ask(QUESTION, max_new_tokens=1), b.ask(QUESTION, max_new_tokens=1)
    assert answer_b.items == answer_a.items and answer_b.visual_tokens == answer_a.visual_tokens
    assert answer_b.time_to_first_token > 0


@pytest.mark.parametrize("kind", ["dense", "cacher"])
def test_session_bf16_close_to_cpu_fp32(kind, record_property):
    cpu_model, dev_model = _pair("bfloat16")
    frames = _frames(cpu_model)
    a, b = _run(cpu_model, kind, frames), _run(dev_model, kind, frames)
    assert a.stats()["kv_cache_tokens"] == b.stats()["kv_cache_tokens"]
    la, lb = a.question_logits(QUESTION), b.question_logits(QUESTION)
    assert bool(torch.isfinite(lb).all())
    err = _rel(lb, la)
    record_property("logits_rel_err", err)
    assert err <= BF16_REL, f"{kind}: bf16 logits differ by {err:.3g} relative from float32 on the CPU"
