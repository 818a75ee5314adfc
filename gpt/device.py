"""Devices, precision and peak throughput: what the training loop needs to pick a
device, enter autocast and turn tokens/s into model FLOPs utilization (MFU)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets (without sparsity).
# Matched by substring of torch.cuda.get_device_name(); the first match wins.
GPU_BF16_PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("A10G", 125.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),  # fp16 tensor cores; V100 has no bf16
    ("T4", 65.0),  # fp16 tensor cores; T4 has no bf16
]

# The environment variable naming the folder of peak_flops.json, the highest matmul peaks measured here.
CACHE_DIR_ENV = "GPTLAB_CACHE_DIR"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """Map "auto" to cuda when available, then mps, then cpu; check an explicit choice exists."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use device=cpu or device=auto")
    return device


def cpu_supports_bf16() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Map "auto" to bfloat16 where the device computes it natively, else float32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        if device.type == "cpu":
            return torch.bfloat16 if cpu_supports_bf16() else torch.float32
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context: matmuls in `dtype`, weights and optimizer state in float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 2048, seconds: float = 1.0) -> float:
    """Measure the FLOP/s of square matrix products of `size` in `dtype` on `device`.

    This is the practical peak a training step can approach on this device; the
    first products are discarded as warm-up.
    """
    # A private generator, so that measuring never shifts the global random stream of a run.
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    for _ in range(3):
        a @ b
    synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    synchronize(device)
    return 2 * size**3 * count / (time.perf_counter() - start)


def _peak_cache_path() -> Path:
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "gptlab")
    return Path(root).expanduser() / "peak_flops.json"


def _highest_peak(key: str, measured: float) -> float:
    """Return the highest peak recorded under `key`, `measured` included, and record it.

    A measurement taken while other jobs share the processor comes out low, and MFU
    computed from it comes out high, sometimes above 100%. Keeping the best value seen on
    this machine makes MFU comparable between runs. A cache that cannot be read or
    written is ignored: MFU is a report, never a reason to stop a run.
    """
    path = _peak_cache_path()
    try:
        known = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    recorded = known.get(key)
    if isinstance(recorded, (int, float)) and recorded >= measured:
        return float(recorded)
    try:
        from gpt.files import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({**known, key: measured}, indent=2, sort_keys=True) + "\n")
    except OSError as error:
        logger.debug("could not record the matmul peak in %s: %s", path, error)
    return measured


def peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float = 0.0) -> float:
    """Peak FLOP/s for MFU: the user's value, else the GPU table, else a measurement.

    A measured peak is the highest of this measurement and the earlier ones on the same
    device, dtype and thread count, kept in peak_flops.json under $GPTLAB_CACHE_DIR
    (default ~/.cache/gptlab).
    """
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_BF16_PEAK_TFLOPS:
            if key in name:
                scale = 1.0 if dtype in (torch.bfloat16, torch.float16) else 0.5  # TF32 is about half
                return tflops * 1e12 * scale
        logger.warning("no peak FLOP/s known for %s; measuring one (set peak_tflops to override)", name)
    else:
        name = f"{torch.backends.cpu.get_cpu_capability()} x{os.cpu_count()}"
    measured = measure_matmul_peak(device, dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    flops = _highest_peak(f"{device.type} {name} {dtype_name} threads={torch.get_num_threads()}", measured)
    logger.info("measured %s matmul peak on %s: %.2f TFLOP/s; using %.2f, the highest measured here (for MFU)",
                dtype_name, device, measured / 1e12, flops / 1e12)
    return flops
