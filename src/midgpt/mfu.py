"""Model FLOPs utilisation: the FLOPs a step needs, over what the devices could do.

Convention: MFU counts the model's own FLOPs (a multiply-add is 2), not the
recomputation of rematerialisation, and counts causal attention honestly: a
token attends to (T + 1) / 2 keys on average, not to T (PaLM's convention, with
its 12 L D T attention term, counts the masked half too).
"""

import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from midgpt.config import ModelConfig

# Dense peak FLOP/s of one JAX device, (bfloat16, float32), by a substring of
# device.device_kind; the first match wins, so variants come before families.
# float32 is the TF32 tensor-core rate on GPUs, which XLA uses for float32
# matmuls at default precision; TPUs run them as bfloat16 passes at that rate.
PEAK_FLOPS = [
    ("H100 PCIe", 756e12, 378e12),
    ("H100 NVL", 835e12, 418e12),
    ("H100", 989e12, 494e12),  # SXM
    ("H200 NVL", 835e12, 418e12),
    ("H200", 989e12, 494e12),  # SXM
    ("H800 PCIe", 756e12, 378e12),
    ("H800", 989e12, 494e12),
    ("GB200", 2500e12, 1250e12),
    ("B200", 2250e12, 1100e12),
    ("A100", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
    ("L40", 181e12, 90.5e12),
    ("L4", 121e12, 60e12),
    ("TPU v3", 61.5e12, 61.5e12),  # per core: each of a chip's 2 cores is a JAX device
    ("TPU v4 lite", 138e12, 138e12),  # v4i
    ("TPU v4", 275e12, 275e12),
    ("TPU v5 lite", 197e12, 197e12),  # v5e
    ("TPU v5e", 197e12, 197e12),  # as some runtimes name it: before "TPU v5", which it contains
    ("TPU v6e", 918e12, 918e12),
    ("TPU v5", 459e12, 459e12),  # v5p
    ("TPU v6 lite", 918e12, 918e12),  # v6e (Trillium)
]


def flops_per_token(cfg: ModelConfig, causal: bool = True) -> float:
    """Training FLOPs (forward and backward) per token: 6 per matmul weight, plus attention.

    causal=False counts every query against all T keys, as XLA computes a masked attention.
    """
    L, D, T, V = cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.vocab_size
    matmul_weights = L * 12 * D * D + V * D  # q, k, v, out: 4 D^2; MLP: 8 D^2; the tied output layer
    keys = (T + 1) / 2 if causal else T
    # Per layer, q.k and prob.v are each 2 D FLOPs per key, forward; backward costs twice the forward: 3x in all.
    return 6 * matmul_weights + 3 * L * 4 * D * keys


def utilisation(cfg: ModelConfig, tokens_per_sec: float, peak_per_device: float) -> float:
    """MFU: the model's FLOP/s at this throughput over the peak of every device in use."""
    return flops_per_token(cfg) * tokens_per_sec / (peak_per_device * jax.device_count())


def table_peak(device_kind: str, dtype: str) -> float | None:
    """The table's peak FLOP/s for one device of this kind, or None if it is not listed."""
    for kind, bf16, f32 in PEAK_FLOPS:
        if kind.lower() in device_kind.lower():
            return f32 if dtype == "float32" else bf16
    return None


def measure_peak(dtype: str, size: int = 2048, seconds: float = 0.3) -> float:
    """Best FLOP/s per device of a large matmul, accumulated in float32 as the model's are.

    All local devices run at once, so devices that share a host's cores (CPU) share them here too.
    """
    devices = jax.local_devices()
    mesh = jax.sharding.Mesh(np.array(devices), ("d",))
    sharded = NamedSharding(mesh, P("d"))
    x = jax.device_put(jnp.ones((len(devices), size, size), dtype), sharded)  # a size x size matrix a device
    matmul = jax.jit(lambda a, b: jnp.einsum("nij,njk->nik", a, b, preferred_element_type=jnp.float32))
    matmul(x, x).block_until_ready()  # compile
    best, deadline = float("inf"), time.perf_counter() + seconds
    for _ in range(100):
        start = time.perf_counter()
        matmul(x, x).block_until_ready()
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return 2 * size**3 / best


def device_peak(dtype: str) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    kind = jax.devices()[0].device_kind
    peak = table_peak(kind, dtype)
    if peak is not None:
        return peak, f"{kind} {dtype} datasheet peak"
    return measure_peak(dtype), f"measured {dtype} matmul peak of this {kind}"


class StepTimer:
    """Tokens/s, ms a step and MFU of the steps since the last restart, leaving out all time outside them."""

    def __init__(self, cfg: ModelConfig, tokens_per_step: int, dtype: str):
        self.cfg, self.tokens_per_step, self.dtype = cfg, tokens_per_step, dtype
        self.peak, self.source = device_peak(dtype)
        # Once, if it reads low: see read. Alone: processes that share a host's cores measure it together.
        self.remeasure = table_peak(jax.devices()[0].device_kind, dtype) is None and jax.process_count() == 1
        self.restart()

    def restart(self):
        """Time from now: after a compile, a traced step, or a log step's evaluation and writes."""
        self.start, self.steps = time.perf_counter(), 0

    def tick(self, steps: int = 1):
        self.steps += steps

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    @contextlib.contextmanager
    def paused(self):
        """Leave the block's time out (a save's copy to host)."""
        paused = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - paused

    def read(self, step: int, say) -> dict[str, float]:
        """{"tokens_per_sec", "step_ms", "mfu"} of the steps since the restart, or {} if there were none."""
        if not self.steps:
            return {}
        seconds = self.seconds
        tokens_per_sec = self.steps * self.tokens_per_step / seconds
        record = {"tokens_per_sec": tokens_per_sec, "step_ms": 1000 * seconds / self.steps,
                  "mfu": utilisation(self.cfg, tokens_per_sec, self.peak)}
        if record["mfu"] > 1 and self.remeasure:  # another process loaded the host as its peak was measured
            self.remeasure, low = False, self.peak
            self.peak = max(self.peak, measure_peak(self.dtype))
            record["mfu"] = utilisation(self.cfg, tokens_per_sec, self.peak)
            say(f"step {step}: MFU read above 100% against the peak measured before training, "
                f"{low / 1e12:.3g} TFLOP/s (the host was busier then?); measured again: {self.peak / 1e12:.3g} TFLOP/s")
        return record
