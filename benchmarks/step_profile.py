"""Where the training step's time goes: its XLA ops, traced with jax.profiler, summed by op and by kind.

python benchmarks/step_profile.py --config=shakespeare_char [--steps=5] [--top=15] [--FIELD=VALUE ...]
compiles the step that launch.py runs, traces `steps` steps of it (whole calls) and prints one JSON line: the
median step, the op time a step (summed over a CPU's threads, or over the GPUs), that time by kind
(matmul, attention, collective, copy, other fusion, other), by part of the model and pass ("attention,
backward", "mlp, recompute", ...) and the `top` ops with their HLO.
Runs unchanged on a CPU or a GPU.
"""

import collections
import json
import os
import re
import statistics
import tempfile
from pathlib import Path

from midgpt.cli import ArgumentParser, add_config_option, positive_int, run, say
from train_throughput import calls_for, check_device, checked_config, run_fields, setup, steps_in, time_steps

COLLECTIVE = re.compile(r" (all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)(-start|-done)?\(")
MATMUL = re.compile(r" (dot|convolution)\(")
# Timelines that profilers derive from the kernels' own (xprof's names): they would count each op twice.
DERIVED = {"XLA Ops", "XLA Modules", "Steps", "Framework Ops", "Framework Name Scope", "Source code"}


def hlo_lines(hlo_text: str) -> tuple[dict[str, str], dict[str, str]]:
    """({instruction name: its line}, {computation name: its body}) of a compiled module's text."""
    instructions, bodies, computation = {}, collections.defaultdict(str), None
    for line in hlo_text.splitlines():
        if line.endswith("{") and not line.startswith(" "):  # a computation's header
            computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
        elif m := re.match(r"\s+(?:ROOT )?%?([\w.\-]+) = ", line):
            instructions[m.group(1)] = line.strip().removeprefix("ROOT ")  # a computation's last: still the op
            bodies[computation] += line + "\n"
    return instructions, bodies


def kind(line: str, bodies: dict[str, str]) -> str:
    """What an instruction does, for the summary: the fusions that hold a matmul count as matmuls."""
    target = re.search(r'custom_call_target="([^"]*)"', line)
    target = target.group(1).lower() if target else ""
    if any(name in target for name in ("fmha", "flash", "attention")):
        return "attention"
    if COLLECTIVE.search(line):
        return "collective"
    called = re.search(r"calls=%?([\w.\-]+)", line)
    if MATMUL.search(line) or "gemm" in target or "matmul" in target or (
            called and MATMUL.search(bodies.get(called.group(1), ""))):
        return "matmul"
    if " fusion(" in line:
        return "other fusion"
    if re.search(r" (copy|transpose)\(", line):
        return "copy"
    return "other"


def part(line: str) -> str:
    """Which part of the step an instruction does, by the JAX name XLA kept: "attention, backward", say."""
    name = re.search(r'op_name="([^"]*)"', line)
    if name is None:
        return "no JAX name"  # XLA's own: the scan's slices of the stacked layers' weights, layout copies
    name = name.group(1)
    if "jvp(" not in name:
        return "outside the gradient"  # the optimiser, the metrics, the loops
    what = next((scope for scope in ("attention", "mlp") if f"/{scope}/" in name or name.endswith(f"/{scope}")),
                "rest of the model")  # norms, embedding, loss
    when = "forward" if "transpose(" not in name else "recompute" if "/rematted_computation" in name else "backward"
    return f"{what}, {when}"


def op_times(trace_dir: str, module: str) -> tuple[collections.Counter, collections.Counter, list[str]]:
    """({HLO op: its own nanoseconds}, {HLO op: calls}, the timelines they came from) of a trace.

    GPU kernels, where a device plane has them; else the host threads' op events (a CPU's).
    """
    import jax

    (path,) = Path(trace_dir).rglob("*.xplane.pb")
    found = []  # (is a device, timeline, own ns, calls)
    for plane in jax.profiler.ProfileData.from_file(str(path)).planes:
        for line in (line for line in plane.lines if line.name not in DERIVED):
            own, calls = collections.Counter(), collections.Counter()
            stack = []  # the enclosing op events: (op, end_ns)
            for event in sorted(line.events, key=lambda e: (e.start_ns, -e.duration_ns)):
                stats = dict(event.stats)
                if "hlo_op" not in stats or not str(stats.get("hlo_module", module)).startswith(module):
                    continue
                while stack and stack[-1][1] <= event.start_ns:
                    stack.pop()
                if stack:  # time inside a nested op event (a loop's body) counts for the inner op only
                    own[stack[-1][0]] -= event.duration_ns
                own[stats["hlo_op"]] += event.duration_ns
                calls[stats["hlo_op"]] += 1
                stack.append((stats["hlo_op"], event.end_ns))
            if calls:
                found.append((plane.name.startswith("/device:"), f"{plane.name} {line.name}", own, calls))
    if any(on_device for on_device, *_ in found):
        found = [f for f in found if f[0]]
    return (sum((f[2] for f in found), collections.Counter()), sum((f[3] for f in found), collections.Counter()),
            sorted({f[1] for f in found}))


def main(argv: list[str]) -> None:
    parser = ArgumentParser(description=__doc__)
    add_config_option(parser, required=True)
    parser.add_argument("--steps", type=positive_int, default=5,
                        help="traced steps, after the compile and 2 warm-up calls; rounds up to whole calls "
                             "(steps_per_call)")
    parser.add_argument("--top", type=positive_int, default=15, help="ops to list, the longest first")
    args, overrides = parser.parse_known_args(argv)
    # XLA's GPU command buffers launch a step's kernels as one, which the trace would show as one op
    # of kind "other"; set before the backend starts (check_device's first jax.devices()).
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_enable_command_buffer=".strip()
    config = checked_config(args.config, overrides, list(vars(args)))

    import equinox as eqx
    import jax  # only once the arguments are good

    check_device(config)
    state, train_step, batches = setup(config)

    # The compiled step itself, so that its HLO names the ops of the trace.
    compiled = train_step.lower(state, batches[0], batches[0]).compile()
    hlo = compiled.as_text()
    module = re.match(r"HloModule ([\w.\-]+)", hlo).group(1)
    # It takes and returns the state's arrays, as the step inside train_step does.
    arrays, _ = time_steps(compiled, eqx.filter(state, eqx.is_array), batches, 2)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        arrays, times = time_steps(compiled, arrays, batches, n := calls_for(args.steps, batches))
        jax.profiler.stop_trace()
        own_ns, calls, timelines = op_times(trace_dir, module)

    instructions, bodies = hlo_lines(hlo)
    steps = n * steps_in(batches[0])
    ms = lambda ns: round(ns / steps / 1e6, 3)
    kinds = {op: kind(instructions.get(op, ""), bodies) for op in own_ns}
    by_kind, by_part = collections.Counter(), collections.Counter()
    for op, ns in own_ns.items():
        by_kind[kinds[op]] += ns
        by_part[part(instructions.get(op, ""))] += ns
    say(json.dumps({
        **run_fields(args.config, overrides),
        "step_ms": round(1000 * statistics.median(times), 2),
        "op_ms_per_step": ms(sum(own_ns.values())),
        "by_kind_ms": {k: ms(ns) for k, ns in by_kind.most_common()},
        "by_part_ms": {k: ms(ns) for k, ns in by_part.most_common()},
        "top": [{"op": op, "ms": ms(ns), "calls": calls[op] / steps, "kind": kinds[op],
                 "hlo": instructions.get(op, "")[:200]} for op, ns in own_ns.most_common(args.top)],
        "timelines": timelines,
    }))


if __name__ == "__main__":
    run(main)
