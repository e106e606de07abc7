"""Training throughput and MFU of the real training step (the one launch.py runs), on random tokens.

python benchmarks/train_throughput.py --config=shakespeare_char [--steps=20] [--FIELD=VALUE ...]
prints one JSON line: backend, device kind and count, parameters, the compile, the first step
(compile included; the first call's, with steps_per_call), median step time, tokens/s and MFU against the peak
it names. Steps run steps_per_call to a call, as in launch.py; --steps rounds up to whole calls. Runs unchanged on a
CPU, a GPU or a TPU; with XLA_FLAGS=--xla_force_host_platform_device_count=N, on N
CPU devices.
"""

import json
import statistics
import time
from collections.abc import Sequence

# JAX, and the midgpt modules that import it, are imported where they are used: the benchmarks check
# their arguments with checked_config before JAX's import, a second that --help and a typo need not wait.
from midgpt.cli import ArgumentParser, add_config_option, positive_int, run, say
from midgpt.config import Config, apply_overrides, check_config, load_config, steps_a_call


def checked_config(name: str, overrides: list[str], options: Sequence[str] = ()) -> Config:
    """Config `name` with the overrides; a MidgptError, before JAX is imported, if it is not a valid one.

    options: the benchmark's own flags, which apply_overrides suggests for a mistyped one.
    Whether the devices can run it is check_device's, once JAX is imported.
    """
    config = apply_overrides(load_config(name), overrides, options)
    check_config(config)
    return config


def check_device(config: Config) -> None:
    """A MidgptError, before anything compiles, if the first device cannot run config."""
    import jax

    from midgpt import precision
    from midgpt.model import check_cudnn

    # As train() does: a cuDNN that cannot run it is one line, not a traceback from the compile.
    check_cudnn(config.model, precision.compute_dtype(config.compute_dtype), jax.devices()[0])


def call_shape(config: Config) -> tuple[int, ...]:
    """The shape of a call's tokens as launch.py makes them: (G, B, T), stacked for steps_a_call(config) steps."""
    shape = (config.g_accum_iters, config.batch_size, config.model.block_size)
    per_call = steps_a_call(config)  # steps_per_call, cut to divide the intervals launch.py acts at
    return (per_call, *shape) if per_call > 1 else shape


def setup(config: Config, compiler_options: dict | None = None):
    """(fresh state, the jitted step, compiled with XLA's compiler_options, 4 random batches already on the devices).

    Each batch is a call's, as launch.py makes them: stacked for steps_a_call(config) steps if more than one.
    """
    import jax
    import numpy as np

    from midgpt.optimizer import make_optimizer
    from midgpt.sharding import batch_sharding, make_mesh
    from midgpt.step import init_state, make_train_step

    optimizer, mesh = make_optimizer(config), make_mesh(config)
    state = init_state(config, optimizer, mesh)
    train_step = make_train_step(config, optimizer, mesh, compiler_options=compiler_options)
    shape = call_shape(config)
    rng = np.random.default_rng(0)
    # A few distinct batches, already on the devices: this measures the step, not the data.
    batches = [jax.device_put(rng.integers(0, config.model.vocab_size, shape, dtype=np.int32),
                              batch_sharding(mesh, ndim=len(shape), batch_axis=len(shape) - 2)) for _ in range(4)]
    return state, train_step, batches


def steps_in(batch) -> int:
    """The training steps that a call on this batch (from setup) runs."""
    return batch.shape[0] if batch.ndim == 4 else 1


def run_fields(name: str, overrides: list[str]) -> dict:
    """What a result was measured on, and of what: the first fields of a benchmark's JSON line."""
    import jax

    return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "device_count": jax.device_count(), "config": name, "overrides": overrides}


def time_steps(train_step, state, batches, n: int):
    """(state after n calls, each call's seconds per step), waiting for each call to finish."""
    import jax

    times = []
    for i in range(n):
        x = batches[i % len(batches)]
        start = time.perf_counter()
        state, metrics = train_step(state, x, x)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - start) / steps_in(x))
    return state, times


def calls_for(steps: int, batches) -> int:
    """The calls that run at least `steps` steps."""
    return -(-steps // steps_in(batches[0]))


def main(argv: list[str]) -> None:
    parser = ArgumentParser(description=__doc__)
    add_config_option(parser, required=True)
    parser.add_argument("--steps", type=positive_int, default=20,
                        help="timed steps, after the compile and 2 warm-up calls")
    args, overrides = parser.parse_known_args(argv)
    config = checked_config(args.config, overrides, list(vars(args)))

    import jax  # only once the arguments are good

    from midgpt import mfu, precision
    from midgpt.model import count_params

    check_device(config)
    state, train_step, batches = setup(config)
    # The peak before the steps and after: a host slowed while one was measured would lower the
    # peak and so raise the MFU (a 2x dip was seen on a shared CPU host); the higher is kept.
    dtype = precision.compute_dtype(config.compute_dtype)
    peak, source = mfu.device_peak(dtype)

    # JAX reports how long it traces, lowers and compiles; their sum is the compile.
    compile_s = []

    def on_event(event: str, seconds: float, **_):
        if event.startswith("/jax/core/compile/"):
            compile_s.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    state, (first_step_s,) = time_steps(train_step, state, batches, 1)
    first_step_s *= steps_in(batches[0])  # the first call's
    jax.monitoring.unregister_event_duration_listener(on_event)
    state, times = time_steps(train_step, state, batches, 2 + calls_for(args.steps, batches))
    step_s = statistics.median(times[2:])

    peak = max(peak, mfu.device_peak(dtype)[0])
    tokens_per_step = batches[0].size // steps_in(batches[0])
    tokens_per_sec = tokens_per_step / step_s
    say(json.dumps({
        **run_fields(args.config, overrides),
        "parameters": count_params(state.model),
        "compute_dtype": dtype,
        "tokens_per_step": int(tokens_per_step),
        "steps_per_call": steps_in(batches[0]),
        "compile_s": round(sum(compile_s), 2),
        "first_step_s": round(first_step_s, 2),
        "step_ms": round(1000 * step_s, 2),
        "tokens_per_sec": round(tokens_per_sec, 1),
        "mfu": round(mfu.utilisation(config.model, tokens_per_sec, peak), 4),
        "peak_flops_per_device": peak,
        "peak_source": source,
    }))


if __name__ == "__main__":
    run(main)
