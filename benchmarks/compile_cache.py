"""What XLA's compilation cache saves launch.py and sample.py: each runs on an empty cache, then again on a warm one.

python benchmarks/compile_cache.py --config=shakespeare_char_cpu [--rounds=2] [--FIELD=VALUE ...]
prints one JSON line: the wall time of a one-step launch.py run (its evaluation included) and of its first
step, and of a sample.py run, cold and warm, medians over the rounds, and the cache's size. The config's data
must be prepared. Both keep every program they compile, or, where JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS
is set, those that took at least that long.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from midgpt.cli import ArgumentParser, add_config_option, positive_int, run, say
from midgpt.errors import MidgptError
from train_throughput import check_device, checked_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(script: str, *args: str, env: dict[str, str]) -> tuple[float, str]:
    """Run a script of this repository; its wall seconds and its stdout."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), *args], env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise MidgptError(f"{script} failed: {last.removeprefix('error: ')}")  # its one-line error, said once
    return time.perf_counter() - start, result.stdout


def main(argv: list[str]) -> None:
    parser = ArgumentParser(description=__doc__)
    add_config_option(parser, required=True)
    parser.add_argument("--rounds", type=positive_int, default=2, help="cold and warm runs of each")
    args, overrides = parser.parse_known_args(argv)
    config = checked_config(args.config, overrides, list(vars(args)))  # its errors before any run

    import jax  # only once the arguments are good

    check_device(config)
    if not jax.config.jax_enable_compilation_cache:
        raise MidgptError("JAX_ENABLE_COMPILATION_CACHE turns off the cache that this measures; unset it")
    seconds = {f"{what}_{cache}": [] for what in ("launch_s", "first_step_s", "sample_s") for cache in ("cold", "warm")}
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(tmp, "cache")}
            for cache in ("cold", "warm"):  # the warm run is another run of the same config
                rundir = os.path.join(tmp, cache)
                wall, stdout = timed("launch.py", f"--config={args.config}", f"--rundir={rundir}", "--max_steps=1",
                                     *overrides, env=env)
                seconds[f"launch_s_{cache}"].append(wall)
                step = re.search(r"steps? [\d-]+ \(compile included\) took ([\d.]+) s", stdout)[1]
                seconds[f"first_step_s_{cache}"].append(float(step))
                seconds[f"sample_s_{cache}"].append(timed("sample.py", f"--rundir={rundir}", "--max_new_tokens=100",
                                                          env=env)[0])
            cache = os.path.join(tmp, "cache")  # none where no program compiled long enough to be kept
            cache_bytes = sum(entry.stat().st_size for entry in os.scandir(cache)) if os.path.isdir(cache) else 0
    say(json.dumps({"config": args.config, "overrides": overrides, "rounds": args.rounds,
                    **{name: round(statistics.median(values), 2) for name, values in seconds.items()},
                    "cache_mib": round(cache_bytes / 2**20, 1)}))


if __name__ == "__main__":
    run(main)
