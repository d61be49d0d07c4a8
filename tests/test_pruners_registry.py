"""Pruner registry: names, metadata without torch, parameters and their errors."""

import subprocess
import sys
from pathlib import Path

import pytest

import streampress
from _pruner_helpers import pruners_with_param
from streampress.pruners import registry
from streampress.pruners.base import ratio_budget

NAMES = streampress.list_pruners()  # the registry is the only list (PRUNER_MATRIX must match it)
SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_list_pruners_names():
    assert NAMES == list(registry.METHODS) and len(set(NAMES)) == len(NAMES)
    assert all(name.isidentifier() and name == name.lower() for name in NAMES), NAMES
    assert streampress.create_pruner is registry.create_pruner


def test_metadata_imports_without_torch():
    code = (
        "import sys; import streampress.pruners.registry as r; d = r.describe_methods(); "
        "assert len(d) == len(r.METHODS) and all(m['paper'] for m in d), d; "
        "assert 'torch' not in sys.modules, 'registry metadata imported torch'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": SRC},
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("name", NAMES)
def test_defaults_in_metadata_match_the_pruner(name):
    pruner = streampress.create_pruner(name)
    assert pruner.name == name
    assert pruner.params == registry.METHODS[name].defaults
    described = {m["name"]: m for m in registry.describe_methods()}[name]
    assert described["params"] == registry.METHODS[name].defaults
    assert set(described["param_help"]) == set(described["params"])


def test_evs_is_dtd_keep_ratio_preset():
    evs = streampress.create_pruner("evs", keep_ratio=0.4)
    assert evs.name == "evs" and evs.params == {"keep_ratio": 0.4}
    dtd = streampress.create_pruner("dtd", keep_ratio=0.4)
    import torch

    x = torch.randn(4, 3, 5, 8)
    assert torch.equal(evs(x), dtd(x))


def test_name_spellings():
    assert streampress.create_pruner("Streaming-Assistant").name == "streaming_assistant"
    assert streampress.create_pruner(" STC ").name == "stc"


def test_unknown_method_lists_available():
    with pytest.raises(ValueError, match="unknown pruning method 'fastv'; available: dtd, mssavt") as err:
        streampress.create_pruner("fastv")
    for name in NAMES:
        assert name in str(err.value)
    with pytest.raises(TypeError, match="pruner name must be a string"):
        streampress.create_pruner(3)


def test_unknown_parameter_names_accepted_ones():
    with pytest.raises(TypeError, match=r"pruner 'dtd' got unknown parameter\(s\) tau_t; accepted: tau, keep_ratio"):
        streampress.create_pruner("dtd", tau_t=0.2)
    with pytest.raises(TypeError, match="accepted: keep_ratio, seed"):
        streampress.create_pruner("random", keep_ratio=0.5, sead=1)
    with pytest.raises(TypeError, match="accepted: keep_ratio$"):
        streampress.create_pruner("evs", tau=0.5)


@pytest.mark.parametrize("name", pruners_with_param("keep_ratio"))
@pytest.mark.parametrize("bad", [0, 1.5, -0.1, float("nan")])
def test_keep_ratio_out_of_range(name, bad):
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
        streampress.create_pruner(name, keep_ratio=bad)


@pytest.mark.parametrize(
    "name, params, exc, message",
    [
        ("dtd", {"keep_ratio": "0.5"}, TypeError, "keep_ratio must be a number"),
        ("dtd", {"keep_ratio": True}, TypeError, "keep_ratio must be a number"),
        ("dtd", {"tau": float("nan")}, ValueError, "tau must be finite"),
        ("dtd", {"tau": 0.3, "keep_ratio": 0.5}, ValueError, "give either keep_ratio or tau, not both"),
        ("streaming_assistant", {"tau_s": 0.3, "keep_ratio": 0.5}, ValueError, "keep_ratio or tau_s"),
        ("streaming_assistant", {"tau_t": "high"}, TypeError, "tau_t must be a real number"),
        ("stc", {"tokens_per_grid": 0}, ValueError, "tokens_per_grid must be a positive integer"),
        ("stc", {"tokens_per_grid": 2.5}, TypeError, "tokens_per_grid must be a positive integer"),
        ("stc", {"tokens_per_grid": 8, "keep_ratio": 0.5}, ValueError, "not both"),
        ("stc", {"window": 0}, ValueError, "window must be a positive integer"),
        ("divprune", {"tokens_per_grid": -3}, ValueError, "tokens_per_grid must be a positive integer"),
        ("random", {"seed": 1.5}, TypeError, "seed must be an integer"),
    ],
)
def test_bad_parameter_values(name, params, exc, message):
    with pytest.raises(exc, match=message):
        streampress.create_pruner(name, **params)


def test_params_reflect_the_mode():
    assert streampress.create_pruner("dtd", keep_ratio=0.3).params == {"tau": None, "keep_ratio": 0.3}
    assert streampress.create_pruner("dtd", tau=0.25).params == {"tau": 0.25, "keep_ratio": None}
    sa = streampress.create_pruner("streaming_assistant", tau_s=0.5)
    assert sa.params == {"tau_t": 0.2, "tau_s": 0.5, "keep_ratio": None}
    assert streampress.create_pruner("stc", keep_ratio=0.5, window=4).params == {
        "tokens_per_grid": None, "keep_ratio": 0.5, "window": 4,
    }
    assert "tau_t=0.2" in repr(sa)


def test_ratio_budget_is_exact():
    assert ratio_budget(0.3, 10) == 3  # 0.3 * 10 == 3.0000000000000004 in floating point
    assert ratio_budget(0.7, 10) == 7
    assert ratio_budget(0.05, 20) == 1  # 0.05 * 20 == 1.0000000000000002
    assert ratio_budget(0.051, 20) == 2
    assert ratio_budget(1e-12, 5) == 1  # never an empty grid
    assert ratio_budget(0.25, 256) == 64
    assert ratio_budget(0.25, 196) == 49
    assert ratio_budget(0.01, 5) == 1
    assert ratio_budget(1.0, 7) == 7
