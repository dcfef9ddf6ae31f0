"""The fast paths' on/off switches (`ops/switches.py`): read from the environment at every call,
eagerly and inside `torch.compile`."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from deltalearn.ops import switches

VARIABLE = "DELTALEARN_TEST_SWITCH"


def test_a_switch_follows_the_environment_while_the_process_runs(monkeypatch):
    monkeypatch.delenv(VARIABLE, raising=False)
    assert switches.environment_value(VARIABLE, "on") == "on"
    monkeypatch.setenv(VARIABLE, "off")
    assert switches.environment_value(VARIABLE, "on") == "off"
    assert not switches.switched_on(None, VARIABLE, "module.SETTING", "the test path")
    assert switches.switched_on("on", VARIABLE, "module.SETTING", "the test path")  # override wins


def test_a_bad_switch_value_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv(VARIABLE, "maybe")
    with pytest.raises(ValueError, match=rf"{VARIABLE}.*\['on', 'off'\].*'maybe'"):
        switches.switched_on(None, VARIABLE, "module.SETTING", "the test path")


def test_a_compiled_read_is_not_recompiled_by_the_first_eager_read(monkeypatch):
    """A graph that reads a switch stays valid when eager code reads the same switch for the first
    time afterwards (a decode step compiled before the eager prefill read it recompiled once), and
    still sees the environment change."""
    monkeypatch.delenv(VARIABLE, raising=False)
    monkeypatch.setattr(switches, "_ENCODED", {})

    @torch.compile(backend="eager", fullgraph=True)
    def scaled(x):
        return x * (2.0 if switches.environment_value(VARIABLE, "on") == "on" else 3.0)

    torch._dynamo.reset()
    counters.clear()
    x = torch.ones(3)
    assert torch.equal(scaled(x), 2 * x)
    assert switches.environment_value(VARIABLE, "on") == "on"  # the first eager read
    assert torch.equal(scaled(x), 2 * x)
    assert counters["stats"]["unique_graphs"] == 1
    monkeypatch.setenv(VARIABLE, "off")
    assert torch.equal(scaled(x), 3 * x)
