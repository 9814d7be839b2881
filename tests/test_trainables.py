"""sctune.service.trainables: the trial hook (the rest runs under Ray in test_reliability.py and test_search.py)."""

import pytest

from sctune.service.trainables import HOOK_ENV, trial_hook


def test_trial_hook_is_none_unless_named(monkeypatch):
    monkeypatch.delenv(HOOK_ENV, raising=False)
    assert trial_hook() is None
    monkeypatch.setenv(HOOK_ENV, "  ")
    assert trial_hook() is None


def test_trial_hook_imports_module_function(monkeypatch):
    import fault_util

    monkeypatch.setenv(HOOK_ENV, "fault_util:inject_fault")
    assert trial_hook() is fault_util.inject_fault
    assert fault_util.fault_env("search:delay=1")[HOOK_ENV] == "fault_util:inject_fault"


@pytest.mark.parametrize("spec", ["fault_util", "fault_util:", ":inject_fault"])
def test_trial_hook_refuses_a_malformed_name(monkeypatch, spec):
    monkeypatch.setenv(HOOK_ENV, spec)
    with pytest.raises(ValueError, match="module:function"):
        trial_hook()
