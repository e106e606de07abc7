"""This machine's processor as /proc/cpuinfo describes it, without JAX: configs read it when they load."""

import functools


def field(cpuinfo_text: str, name: str) -> str:
    """The value /proc/cpuinfo's text gives a field first ("vendor_id": "GenuineIntel"), or "" where it has none."""
    for line in cpuinfo_text.splitlines():
        key, colon, value = line.partition(":")
        if colon and key.strip() == name:
            return value.strip()
    return ""


def flags(cpuinfo_text: str) -> set[str]:
    """The x86 feature flags that /proc/cpuinfo's text lists: "avx512_bf16", "amx_bf16", ..."""
    return set(field(cpuinfo_text, "flags").split())


@functools.cache
def info() -> str:
    """This machine's /proc/cpuinfo, or "" where there is none (not Linux): then no flags."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""
