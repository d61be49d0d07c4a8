"""The pruner matrix covers exactly the registry, and its entries mean what they say.

Every pruner test parametrizes over ``PRUNER_MATRIX`` (or over the registry), so this is
the test that makes a newly registered method fail loudly, by name, until it has mild and
aggressive parameters in ``tests/_pruner_helpers.py``; from then on it is tested everywhere.
"""

import importlib

import pytest
import torch

import streampress
from _pruner_helpers import PRUNER_MATRIX, matrix_problems, stream
from streampress.pruners.base import ScorePruner
from streampress.pruners.registry import METHODS


def test_matrix_covers_exactly_the_registered_pruners():
    problems = matrix_problems()
    assert not problems, "\n".join(problems)
    assert list(PRUNER_MATRIX) == streampress.list_pruners()  # same order: stable test ids


def test_a_missing_entry_is_named_with_what_to_add():
    incomplete = {name: modes for name, modes in PRUNER_MATRIX.items() if name != "stc"}
    incomplete["fastv"] = [{}, {}]
    incomplete["dtd"] = [{"tau": 0.5}]
    problems = "\n".join(matrix_problems(incomplete))
    assert "'stc' is registered but has no entry in PRUNER_MATRIX" in problems
    assert "add 'stc': [mild_params, aggressive_params]" in problems
    assert "entry for 'fastv', which is not a registered" in problems
    assert "PRUNER_MATRIX['dtd'] must be [mild_params, aggressive_params]" in problems


@pytest.mark.parametrize("name", list(PRUNER_MATRIX))
def test_mild_keeps_more_than_aggressive(name):
    mild, aggressive = PRUNER_MATRIX[name]
    for x in (stream(5), stream(4, H=3, W=4, D=6)):
        kept_mild = int(streampress.create_pruner(name, **mild)(x).sum())
        kept_aggressive = int(streampress.create_pruner(name, **aggressive)(x).sum())
        assert x.shape[0] * x.shape[1] * x.shape[2] > kept_mild > kept_aggressive > 0, (kept_mild, kept_aggressive)


@pytest.mark.parametrize("name", list(PRUNER_MATRIX))
def test_a_method_off_the_score_base_says_why(name):
    pruner = streampress.create_pruner(name)
    if not isinstance(pruner, ScorePruner):
        doc = importlib.import_module(f"streampress.pruners.{METHODS[name].module}").__doc__
        assert "ScorePruner" in doc, f"{name}: say in the module docstring why it is not a ScorePruner"
    assert torch.equal(pruner(stream(2)), streampress.create_pruner(name)(stream(2)))
