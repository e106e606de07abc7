"""This machine's processor as /proc/cpuinfo describes it, without JAX: configs read it when they load."""

import functools


def flags(cpuinfo_text: str) -> set[str]:
    """The x86 feature flags that /proc/cpuinfo's text lists: "avx512_bf16", "amx_bf16", ..."""
    return {flag for line in cpuinfo_text.splitlines() if line.startswith("flags")
            for flag in line.partition(":")[2].split()}


@functools.cache
def info() -> str:
    """This machine's /proc/cpuinfo, or "" where there is none (not Linux): then no flags."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""
