import json

import pytest
import torch

from gpt import device as device_module
from gpt.device import peak_flops, resolve_device


@pytest.fixture
def measurements(monkeypatch, tmp_path):
    """Replace the matmul measurement by a queue of values, with a cache folder of this test's own."""
    monkeypatch.setenv("GPTLAB_CACHE_DIR", str(tmp_path))
    queue = []
    monkeypatch.setattr(device_module, "measure_matmul_peak", lambda device, dtype: queue.pop(0))
    return queue


def test_peak_keeps_the_highest_measurement(measurements):
    measurements.extend([2e11, 1e11, 3e11])
    cpu = torch.device("cpu")
    assert [peak_flops(cpu, torch.bfloat16) for _ in range(3)] == [2e11, 2e11, 3e11]


def test_peak_is_recorded_per_dtype(measurements):
    measurements.extend([2e11, 1e11])
    cpu = torch.device("cpu")
    peak_flops(cpu, torch.bfloat16)
    assert peak_flops(cpu, torch.float32) == 1e11


def test_unreadable_cache_is_replaced(measurements, tmp_path):
    (tmp_path / "peak_flops.json").write_text("{not json")
    measurements.append(2e11)
    assert peak_flops(torch.device("cpu"), torch.bfloat16) == 2e11
    assert list(json.loads((tmp_path / "peak_flops.json").read_text()).values()) == [2e11]


def test_override_skips_measurement(measurements):
    assert peak_flops(torch.device("cpu"), torch.bfloat16, override_tflops=0.5) == 0.5e12


def test_unknown_device_is_named():
    with pytest.raises(ValueError, match="unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps"):
        resolve_device("tpu")
