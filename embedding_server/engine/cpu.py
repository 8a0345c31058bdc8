"""What the CPU offers this process: how many cores it may use, and whether it computes bf16 natively."""
from __future__ import annotations

import os


def usable_cpus() -> int:
    """Cores this process may use: the cgroup CPU quota (Kubernetes, Render) or the affinity mask."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:
        count = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as handle:
            quota, period = handle.read().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_bf16(flags: set[str] | None = None) -> bool:
    """Whether the CPU computes bf16 natively (AMX or AVX512-BF16); without it bf16 is emulated and slower."""
    flags = cpu_flags() if flags is None else flags
    return bool({"amx_bf16", "avx512_bf16"} & flags)
