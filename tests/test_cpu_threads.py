"""CPU intra-op threads for small models: one per idle core, never more than the cores there are."""

from __future__ import annotations

import json

import pytest
import torch

from fastes.es import runtime


@pytest.mark.parametrize(("cores", "load", "expected"), [
    (2, 0.1, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 0.9, 1), (2, 5.0, 1), (16, 3.2, 13), (16, 0.0, 16), (1, 0.0, 1),
])
def test_idle_cores_is_cores_minus_load_rounded_at_least_one(cores, load, expected):
    assert runtime.idle_cores(cores, load) == max(1, min(cores, int(cores - load + 0.5)))
    assert runtime.idle_cores(cores, load) == expected


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _model(tmp_path, hidden):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": hidden}))
    return tmp_path


def test_small_model_gets_one_thread_per_idle_core(tmp_path, monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.getloadavg", lambda: (0.2, 0, 0))
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert runtime.cpu_threads_for(_model(tmp_path, 128)) == 2 and torch.get_num_threads() == 2
    monkeypatch.setattr("os.getloadavg", lambda: (1.3, 0, 0))
    assert runtime.cpu_threads_for(_model(tmp_path, 128)) == 1 and torch.get_num_threads() == 1


def test_large_models_and_omp_num_threads_are_left_alone(tmp_path, monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert runtime.cpu_threads_for(_model(tmp_path, 4096)) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.cpu_threads_for(_model(tmp_path, 128)) is None
