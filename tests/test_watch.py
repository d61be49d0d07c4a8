"""Proactive answers (``session.watch``): the trigger fires at scene cuts and nowhere else, probes
leave no trace, and a yes/no watch speaks once when its answer turns to yes.

Oracles: videos with known cuts (solid-colour and textured segments), a stream that was
never watched (bit-identical state), and logits forced through a hook on the LM head.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import streampress
from _model_helpers import tiny
from _session_helpers import assert_same, fingerprint
from streampress.session import StreamingSession
from streampress.watch import Trigger, change_signal, firing_items

QWEN25, LLAVA = "random:qwen2.5-vl-tiny", "random:llava-onevision-tiny"
FPS = 2.0


def cut_video(model, lengths, seed=0):
    """Segments of ``lengths`` frames, alternately one solid colour and one fixed texture;
    returns the frames and the index of the first frame of every segment after the first."""
    side = 4 * model.params.factor if hasattr(model, "params") else 28  # Qwen: 4x4 tokens per item
    rng = np.random.default_rng(seed)
    frames, cuts = [], []
    for k, n in enumerate(lengths):
        if k:
            cuts.append(sum(lengths[:k]))
        if k % 2 == 0:
            look = np.full((side, side, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        else:
            look = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        frames.extend([look] * n)
    return np.stack(frames), cuts


@pytest.mark.parametrize("arch", [QWEN25, LLAVA])
@pytest.mark.parametrize("lengths", [(8, 8, 8, 8), (7, 10, 5, 9, 6)])  # cuts on and off temporal-patch borders
def test_trigger_fires_within_one_item_of_every_cut_and_nowhere_else(arch, lengths):
    m = tiny(arch, "float32")
    frames, cuts = cut_video(m, lengths, seed=len(lengths))
    s = StreamingSession(m)
    w = s.watch("What changed?")
    for i in range(0, len(frames), 3):
        s.add_frames(frames[i:i + 3], np.arange(i, min(i + 3, len(frames))) / FPS)
    fpi = m.frames_per_item
    fired_items = {int(round(s._signals[i][0] * FPS)) // fpi for i in firing_items(Trigger(), s._signals)}
    cut_items = {c // fpi for c in cuts}
    near = {i + d for i in cut_items for d in (0, 1)}  # the item holding the cut, or the next one
    for c in cut_items:  # every cut: the item holding it or the next one fires
        assert c in fired_items or c + 1 in fired_items, (c, sorted(fired_items))
    assert fired_items <= near, (sorted(fired_items), sorted(cut_items))  # nowhere else
    # the watch probed exactly at the firing chunks
    assert w.probes >= 1 and {int(round(at * FPS)) // fpi for _, at in w.probe_times} <= fired_items


def test_change_signal_is_the_dtd_drop_fraction_and_scale_free():
    g = torch.randn(4, 4, 5, 8, generator=torch.Generator().manual_seed(0))
    g[1] = g[0] + 0.1 * torch.randn(4, 5, 8)

    def drop(a, b):
        return float((torch.nn.functional.cosine_similarity(a, b, dim=-1) > 0.5).float().mean())

    by_hand = [(None, None), (drop(g[1], g[0]), None)] + [(drop(g[t], g[t - 1]), drop(g[t], g[t - 2])) for t in (2, 3)]
    assert change_signal(g, None, 0.5) == by_hand
    assert change_signal(g * 1e-15, None, 0.5) == by_hand
    assert change_signal(g[2:], g[:2], 0.5) == by_hand[2:]
    assert change_signal(g[1:], g[:1], 0.5) == by_hand[1:]


@pytest.mark.parametrize("pruned", [False, True])
def test_probes_leave_no_trace(pruned):
    m = tiny(QWEN25)
    frames, _ = cut_video(m, (5, 6, 7, 6), seed=3)

    def make():
        return StreamingSession(m, pruner=streampress.create_pruner("streaming_assistant", keep_ratio=0.5)
                                if pruned else None, cacher=streampress.create_cacher(rho=0.5))

    watched, never = make(), make()
    watches = [watched.watch("What is on screen?", max_new_tokens=3),
               watched.watch("Is it dark?", yes_no=True),
               watched.watch("Which colour?", options=["red", "green", "blue"])]
    for i in range(0, len(frames), 5):
        for s in (watched, never):
            s.add_frames(frames[i:i + 5], np.arange(i, min(i + 5, len(frames))) / FPS)
    assert all(w.probes >= 2 for w in watches)
    a, b = fingerprint(watched), fingerprint(never)
    assert a["stats"].pop("watch_probes") == sum(w.probes for w in watches) and b["stats"].pop("watch_probes") == 0
    assert_same(a, b)
    assert torch.equal(watched.question_logits("Q?"), never.question_logits("Q?"))


def test_yes_no_watch_speaks_once_when_it_turns_to_yes():
    m = tiny(QWEN25, "float32")
    frames, cuts = cut_video(m, (6, 6, 6, 6, 6, 6), seed=5)
    letter = {l: m.tokenize(l)[0] for l in "AB"}
    force = {"to": "B"}  # "B. No" until armed

    def bias(module, args, output):
        out = output.clone()
        out[..., letter[force["to"]]] += 1e4
        return out

    handle = m.hf_model.lm_head.register_forward_hook(bias)
    try:
        s = StreamingSession(m)
        heard = []
        w = s.watch("Is someone there?", yes_no=True, on_answer=heard.append)
        for i in range(0, len(frames), 6):
            if i >= 18:
                force["to"] = "A"  # from the fourth segment on: "A. Yes"
            s.add_frames(frames[i:i + 6], np.arange(i, i + 6) / FPS)
    finally:
        handle.remove()
    assert w.probes >= 4  # probed on both sides of the switch
    assert len(heard) == 1 and heard[0].text == "Yes" and heard[0].time >= 18 / FPS
    assert s.poll_events() == heard and s.poll_events() == []


def test_min_interval_cancel_and_bad_arguments():
    m = tiny(QWEN25, "float32")
    frames, _ = cut_video(m, (4,) * 8, seed=6)
    s = StreamingSession(m)
    spaced = s.watch("What changed?", min_interval=10.0)
    gone = s.watch("Anything?")
    gone.cancel()
    for i in range(0, len(frames), 4):
        s.add_frames(frames[i:i + 4], np.arange(i, i + 4) / FPS)
    assert gone.probes == 0 and spaced.probes == 2  # 16 s of video, 7 cuts, 10 s apart at least
    (t1, _), (t2, _) = spaced.probe_times
    assert t2 - t1 >= 10.0
    for kwargs, exc in [(dict(question=""), ValueError), (dict(question="Q", min_interval=-1), ValueError),
                        (dict(question="Q", yes_no=True, options=["a", "b"]), ValueError),
                        (dict(question="Q", trigger="relative"), TypeError),
                        (dict(question="Q", on_answer=3), TypeError),
                        (dict(question="Q", max_new_tokens=0), ValueError)]:
        with pytest.raises(exc):
            s.watch(**kwargs)
    with pytest.raises(ValueError):
        Trigger(mode="sometimes")


def test_run_command_prints_proactive_answers_with_their_times(tmp_path, capsys):
    import av

    from streampress.cli import main

    side, rng = 112, np.random.default_rng(1)
    looks = [np.full((side, side, 3), (30, 60, 200), np.uint8), rng.integers(0, 256, (side, side, 3), dtype=np.uint8),
             np.full((side, side, 3), (220, 200, 20), np.uint8)]
    path = tmp_path / "cuts.mp4"
    with av.open(str(path), "w") as container:  # 4 fps, cuts at 3 s and 6 s
        stream = container.add_stream("libx264", rate=4)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        for i in range(36):
            for packet in stream.encode(av.VideoFrame.from_ndarray(looks[i // 12], format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    rc = main(["run", str(path), "--model", QWEN25, "--fps", "2", "--watch", "Did the scene change?",
               "--ask", "end: What happened?", "--json", "-q"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert [e["trigger_time"] for e in result["watch_events"]] == [3.0, 6.0]
    assert all(e["watch"] == "Did the scene change?" and e["stream_time"] >= e["trigger_time"]
               for e in result["watch_events"])
    assert result["stats"]["watch_probes"] == 2 and len(result["answers"]) == 1
