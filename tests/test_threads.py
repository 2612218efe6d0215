"""Default CPU thread count (threads.py): all cores with passive OpenMP waiting, else the CPUs
not busy with other work; never below 1. Speed itself is measured by benchmarks/threads.py."""

from __future__ import annotations

import os

import torch

from napari_genseg import threads


def test_passive_wait_uses_all_allowed_cores(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setattr(threads, "busy_cpus", lambda *a: 1000.0)
    assert threads.default_threads() == max(1, min(torch.get_num_threads(), threads.available_cpus()))


def test_without_passive_wait_busy_cpus_are_left_alone(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(threads, "busy_cpus", lambda *a: 1000.0)
    assert threads.default_threads() == 1
    monkeypatch.setattr(threads, "busy_cpus", lambda *a: 0.0)
    assert threads.default_threads() == max(1, min(torch.get_num_threads(), threads.available_cpus()))
    monkeypatch.setattr(threads, "busy_cpus", lambda *a: None)
    assert threads.default_threads() >= 1


def test_policy_is_not_changed_once_torch_is_loaded(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert threads.prefer_passive_wait() is False  # torch is imported: too late to matter
    assert "OMP_WAIT_POLICY" not in os.environ


def test_configure_threads_sets_and_zero_means_torch_default():
    before = torch.get_num_threads()
    try:
        assert threads.configure_threads(1) == 1 and torch.get_num_threads() == 1
        assert threads.configure_threads(0) >= 1
    finally:
        torch.set_num_threads(before)


def test_busy_cpus_is_a_number_here():
    b = threads.busy_cpus(0.05)
    assert b is None or b >= 0.0


def test_default_threads_are_applied(abdomen_ct, double_checkpoint, tmp_path, monkeypatch):
    import json

    from napari_genseg.cli import main

    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "default_threads", lambda: 1)
    try:
        torch.set_num_threads(2)
        assert main(["segment", str(abdomen_ct), "--model", "testdouble", "--checkpoint", str(double_checkpoint),
                     "--out", str(tmp_path / "m.nii.gz"), "--device", "cpu", "--slices", "0:1", "--quiet"]) == 0
        assert torch.get_num_threads() == 1
        assert json.loads((tmp_path / "m.json").read_text())["inference"]["backend"]["threads"] == 1
    finally:
        torch.set_num_threads(before)
