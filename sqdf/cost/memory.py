"""A card's memory: sizes as users write them, the one CUDA device's, and whether a traced peak
fits it with the headroom for what the trace cannot see."""

from __future__ import annotations

import re

from sqdf.errors import ConfigError

# What the trace cannot see, set aside before a verdict: the CUDA context torch creates on
# the device (about 0.5 GiB, more with cuDNN/cuBLAS workspaces loaded), and a share of the
# traced peak for the caching allocator's rounding and fragmentation
CUDA_CONTEXT = 2**29
ALLOCATOR_MARGIN = 0.10


def headroom(peak: int) -> int:
    """Bytes set aside beside a traced peak before it is said to fit: the CUDA context plus
    ALLOCATOR_MARGIN of the peak."""
    return CUDA_CONTEXT + int(ALLOCATOR_MARGIN * peak)


def fits(peak: int, gpu_memory: int) -> bool:
    return peak + headroom(peak) <= gpu_memory


UNITS = {"": 2**30, "gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6}


def parse_memory(text: str) -> int:
    """'24GiB', '24 GB', '80' (GiB) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m[2].lower() if m else ""
    if m is None or unit not in UNITS or float(m[1]) <= 0:
        raise ConfigError(f"--gpu-memory {text!r}: give a size such as 24GiB, 24GB or 80 (GiB)")
    return int(float(m[1]) * UNITS[unit])


def detected_gpu_memory() -> int | None:
    """The first CUDA device's memory, where there is one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(0).total_memory)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
