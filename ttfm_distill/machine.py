"""Facts about this machine that settings depend on (a leaf module: torch only, so the settings can ask it
without importing the modules that use them)."""

from __future__ import annotations

import torch


def native_bf16(device_type: str | None = None) -> bool:
    """Whether ``device_type`` ("cuda" or "cpu"; this machine's when ``None``) computes in bf16 natively: a CUDA
    GPU that supports it, or a CPU with AVX512-BF16 or AMX (oneDNN's bf16 kernels; elsewhere bf16 is emulated and
    slower than fp32)."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and bool(check()) for check in checks)
