"""Timing and device facts shared by the benchmarks (medians; L2 flushed on GPU)."""

from __future__ import annotations

import re
from pathlib import Path

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def warm_cpu_allocations() -> None:
    """Serve CPU allocations from glibc's heap and keep freed memory, as a caching allocator
    does: otherwise each fresh output above glibc's (moving) mmap threshold is page-faulted in,
    which costs more than the kernels themselves and flips between runs (one bitsandbytes
    dequantize of 4096x4096 was timed at 3 ms and at 18 ms depending on the heap's history)."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 34)


def median_ms(fn, device: torch.device, quick: bool = False) -> float:
    """Median time of fn() in milliseconds, after warm-up."""
    if device.type == "cuda":
        import triton.testing

        # do_bench flushes L2 between runs (memory-bound kernels are timed cold)
        return float(triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=50 if quick else 200,
                                             return_mode="median"))
    import torch.utils.benchmark as tb

    fn()  # warm-up (first-call compilation, allocator)
    m = tb.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.3 if quick else 1.0)
    return m.median * 1e3


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache (Linux sysfs); 256 MiB where the system does not say."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        if text[:-1].isdigit() and text[-1] in "KMG":
            sizes.append(int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]])
    return max(sizes, default=256 << 20)


def read_bandwidth_gbps(device: torch.device, quick: bool) -> float:
    """Measured streaming read bandwidth of the device (GB/s): the ceiling of a read-mostly
    kernel whose bytes come from memory. A reduction over a buffer far larger than the caches
    (on CPU four times the last-level cache, at least 1 GiB, summed by torch's threads; on GPU
    4 GiB), which reads every byte once and writes nothing. A copy is no ceiling: it writes as
    much as it reads, and its write-allocate traffic is not in its byte count."""
    nbytes = (4 << 30) if device.type == "cuda" else max(1 << 30, 4 * last_level_cache_bytes())
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    ms = median_ms(buf.sum, device, quick)
    return nbytes / ms / 1e6
