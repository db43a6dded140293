"""GPU tests: skipped, with the reason, where CuPy or a CUDA device is absent (CI).  Run them on a GPU host."""

from __future__ import annotations

import functools

import pytest


@functools.cache
def gpu_missing() -> str:
    """Why the GPU tests cannot run here ("" when they can)."""
    try:
        import cupy
    except ImportError as exc:
        return f"CuPy is not installed ({exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - any CUDA failure means no usable device
        return f"no usable CUDA device ({exc})"
    return "" if count > 0 else "no CUDA device"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = gpu_missing()
    if not reason:
        return
    for item in items:
        if "/tests/gpu/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.skip(reason=f"GPU test: {reason}"))
