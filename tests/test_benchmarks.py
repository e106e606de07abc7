"""The benchmarks refuse bad input in one line, before any compile; some results (more: test_mfu, test_memory)."""

import importlib
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO_ROOT
from midgpt.config import config_names
from midgpt.tokenizer import gpt2

CONFIG = "--config=shakespeare_char_cpu"
TINY = ["--model.n_layer=1", "--model.n_embd=32", "--model.n_head=2", "--batch_size=4", "--model.block_size=32"]


@pytest.mark.parametrize("script, args, fragment", [
    ("train_throughput", [CONFIG, "--model.n_layers=2"], "model.n_layer"),
    ("train_throughput", ["--config=nope"], "nope"),
    # Its help as it was run, not "python train_throughput.py", which is not there.
    ("train_throughput", [CONFIG, "--steps=0"], "--steps: must be positive, got 0 (see python "
                                                 "benchmarks/train_throughput.py --help)"),
    ("train_throughput", [CONFIG, "--steps=1e3"], "--steps: expected a whole number, got '1e3'"),
    ("step_profile", [CONFIG, "--model.remat=bogus"], "model.remat"),
    # The second variant is refused before the first compiles.
    ("step_ratios", [CONFIG, "--rounds=1", "--steps=1", "--", " ".join(TINY), " ".join(TINY) + " --model.remat=ful"],
     "model.remat"),
    ("step_ratios", [CONFIG, "--", " ".join(TINY), "--xla_cpu_no_such_option=1"], "xla_cpu_no_such_option"),
    ("step_ratios", [CONFIG, "", "--model.remat=dots"],
     "variants go after --, each one quoted: -- \"\" \"--model.remat=dots\""),
    ("step_ratios", [CONFIG, "--round=1", "--", ""], "unrecognized arguments: --round=1; did you mean --rounds?"),
    ("step_ratios", [CONFIG, "--", " ".join(TINY), "--xla_backend_optimization_level"], "--xla_NAME=VALUE"),
    ("fsdp_memory", [CONFIG, "--devices=0"], "--devices"),
    ("fsdp_memory", [CONFIG, "--devices=3", "--batch_size=4"], "batch_size"),
    ("fsdp_memory", [CONFIG, "--compute_dtype=float16"], "compute_dtype"),
    ("sample_throughput", [CONFIG, "--model.n_head=3"], "model.n_head"),
    ("sample_throughput", [CONFIG, "--max_new_tokens=0"], "--max_new_tokens"),
    # 440 GB of keys and values: XLA refuses the allocation at once.
    ("sample_throughput", [CONFIG, "--num_samples=1000000", "--max_new_tokens=100"],
     "1000000 samples of 101 tokens do not fit the device's memory; lower --num_samples or --max_new_tokens"),
    # launch.py's check, missing from the benchmarks: a traceback of cuDNN's from the compile.
    ("train_throughput", [CONFIG, *TINY, "--model.attention=cudnn"], "model.attention=cudnn does not run on cpu"),
    ("step_ratios", [CONFIG, "--", " ".join(TINY), " ".join(TINY) + " --model.attention=cudnn"],
     "model.attention=cudnn does not run on cpu"),
    ("checkpoint_cost", [CONFIG, "--interval=0"], "--interval"),
    ("checkpoint_cost", [CONFIG, "--steps=9", "--interval=10"], "--interval=10 saves no checkpoint in --steps=9"),
    ("compile_cache", [CONFIG, "--rounds=0"], "--rounds"),
    ("compile_cache", [CONFIG, "--model.remat=ful"], "model.remat"),
    ("compile_cache", [CONFIG, "--data_dir=no_such_dir"], "launch.py failed: no_such_dir not found; run python "),
    ("step_memory", [CONFIG, *TINY, "--chunks=1,3"], "--chunks"),
    ("step_memory", [CONFIG, *TINY, "--pieces=3"], "--pieces"),
    ("prepare_openwebtext", ["--num_proc=0"], "--num_proc"),
    ("prepare_openwebtext", ["--text", "no_such_file.txt"], "--text"),
])
def test_benchmark_refuses_bad_input_in_one_line(script, args, fragment, env=None):
    result = subprocess.run([sys.executable, f"benchmarks/{script}.py", *args], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].count("error: ") == 1, result.stderr
    assert fragment in lines[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, settings, status, fragment", [
    (["--steps=3"], {}, 2, "takes no arguments; set CONFIG, ARGS, PYTHON, BUDGET_S, PART or OUT"),
    # A PART that names neither half ran nothing, and passed.
    ([], {"PART": "3"}, 2, "PART is 1, 2 or unset (both), not '3'"),
    ([], {"BUDGET_S": "9m"}, 2, "BUDGET_S is whole seconds, not '9m'"),  # every step failed in bash's arithmetic
    # A JAX without its CUDA plugin: each timing ran on the CPU until its limit, the cuDNN test skipped, and the
    # lease's whole call came back with nothing.
    ([], {"CONFIG": "openwebtext"}, 1, "JAX runs on cpu here (see {out}/setup.log), not a GPU; a rehearsal names a "
                                      "*_cpu CONFIG"),
])
def test_gpu_check_refuses_bad_settings_in_one_line(args, settings, status, fragment, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), **settings}
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == status
    assert result.stderr.strip() == f"error: {fragment.format(out=tmp_path)}"


def test_prepare_benchmark_refuses_a_binary_text_at_once(tmp_path):
    # A prepared train.bin (uint16 ids, valid UTF-8 with NULs): the error came after a 10 MB corpus was written,
    # and named that corpus, since deleted.
    (tmp_path / "train.bin").write_bytes((np.arange(1000) % 65).astype(np.uint16).tobytes())  # ids of 65 chars
    test_benchmark_refuses_bad_input_in_one_line("prepare_openwebtext", ["--text", str(tmp_path / "train.bin")],
                                                 f"--text {tmp_path}/train.bin: holds NUL characters")


def test_compile_cache_refuses_a_cache_turned_off():
    # It ran the first round, then failed in a traceback: there was no cache to measure.
    test_benchmark_refuses_bad_input_in_one_line("compile_cache", [CONFIG], "JAX_ENABLE_COMPILATION_CACHE",
                                                 env={**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"})


def test_step_ratios_refuses_a_variant_whose_batch_does_not_split_over_the_devices():
    # Checked with the others, before the first variant compiles.
    test_benchmark_refuses_bad_input_in_one_line(
        "step_ratios", [CONFIG, "--", " ".join(TINY), " ".join(TINY) + " --batch_size=3"],
        "variant '--model.n_layer=1 --model.n_embd=32 --model.n_head=2 --batch_size=4 --model.block_size=32 "
        "--batch_size=3': batch_size=3 does not split over the 2 devices of the mesh",
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})


def test_help_shows_each_default_once():
    # The benchmarks' --help showed none of their defaults; sample.py's are said in words where None stands in.
    def options(script: str) -> str:
        result = subprocess.run([sys.executable, script, "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        return " ".join(result.stdout.partition("options:")[2].split())  # unwrapped

    assert "--steps STEPS timed steps, after the compile and 2 warm-up calls (default: 20)" in options(
        "benchmarks/train_throughput.py")
    assert "--rounds ROUNDS rounds of every variant in turn (default: 3)" in options("benchmarks/step_ratios.py")
    # --config named no config: each script's now lists them, as launch.py's does.
    configs = f"a config of midgpt.configs: {', '.join(config_names())}"
    assert all(f"--config CONFIG {configs}" in options(f"benchmarks/{script}.py") for script in (
        "train_throughput", "step_ratios", "step_profile", "step_memory", "fsdp_memory", "compile_cache",
        "checkpoint_cost"))
    assert f"--config CONFIG its model, untrained; {configs} (default: shakespeare_char)" in options(
        "benchmarks/sample_throughput.py")
    sample = options("sample.py")
    assert "--temperature TEMPERATURE 0 is greedy (default: 0.8)" in sample and sample.count("(default:") == 7
    assert "--step STEP the checkpoint to use (default: the newest that finished and restores)" in sample


@pytest.mark.parametrize("script, args, fragment", [
    ("train_throughput", [CONFIG, "--model.remat=ful"], "model.remat"),
    ("step_ratios", [CONFIG, "--", " ".join(TINY), " ".join(TINY) + " --model.remat=ful"], "model.remat"),
    ("step_profile", [CONFIG, "--top=0"], "--top"),
    ("step_memory", [CONFIG, *TINY, "--chunks=1,3"], "--chunks"),
    ("compile_cache", [CONFIG, "--rounds=0"], "--rounds"),
    ("checkpoint_cost", [CONFIG, "--interval=0"], "--interval"),
    ("sample_throughput", [CONFIG, "--max_new_tokens=0"], "--max_new_tokens"),
    ("fsdp_memory", [CONFIG, "--model.remat=ful"], "model.remat"),
])
def test_benchmark_answers_help_and_bad_arguments_before_importing_jax(script, args, fragment):
    # Each imported JAX before it checked its arguments: --help and a typo waited a second and more for it.
    for argv, status in [(["--help"], 0), (args, 1)]:
        result = subprocess.run([sys.executable, "-X", "importtime", f"benchmarks/{script}.py", *argv], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=60)
        # "import time: self | cumulative | module", the module indented by how deep it was imported
        modules = [line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                   if line.startswith("import time:")]
        said = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
        assert result.returncode == status and "jax" not in modules, result.stderr
        if status == 0:
            assert "usage:" in result.stdout and not said, result.stderr
        else:
            assert len(said) == 1 and said[0].startswith("error: ") and fragment in said[0], result.stderr


def test_checkpoint_cost_times_both_loops_and_reports_their_ratio():
    result = subprocess.run([sys.executable, "benchmarks/checkpoint_cost.py", CONFIG, *TINY, "--steps=5",
                             "--interval=2", "--rounds=2"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # launch.py's program: the config's 10 steps a call, cut to 2 to divide the interval; 5 steps round up to 3 calls,
    # each a save, in each of the 2 rounds.
    assert (out["steps_per_call"], out["steps"], out["saves_per_round"]) == (2, 6, 3)
    assert len(out["train_s_without_rounds"]) == len(out["train_s_with_rounds"]) == 2
    assert len(out["save_blocking_s"]) == 6
    # Each loop's best round (noise only adds), the median save.
    assert out["train_s_without"] == min(out["train_s_without_rounds"]) > 0
    assert out["train_s_with"] == min(out["train_s_with_rounds"]) > 0
    assert out["save_blocking_s_median"] == statistics.median(out["save_blocking_s"]) > 0
    assert out["slowdown"] == pytest.approx(out["train_s_with"] / out["train_s_without"] - 1)
    assert out["checkpoint_bytes"] > 0


def test_a_result_printed_into_a_closed_pipe_ends_quietly():
    # `| true` closes the pipe before the JSON line is written: it ended in a BrokenPipeError traceback.
    result = subprocess.run(f"set -o pipefail; {sys.executable} benchmarks/fsdp_memory.py {CONFIG} --batch_size=16 "
                            "| true", shell=True, executable="/bin/bash", cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr


def test_compile_cache_times_a_warm_first_step_faster_than_a_cold_one(shakespeare_data_dir):
    # What README quotes: the warm run's first step reads its programs from the cache the cold run filled.
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_")}
    env.pop("JAX_ENABLE_COMPILATION_CACHE", None)  # a cache turned off is refused: see the test above
    result = subprocess.run([sys.executable, "benchmarks/compile_cache.py", CONFIG, *TINY, "--eval_iters=1",
                             f"--data_dir={shakespeare_data_dir}", "--rounds=1"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["first_step_s_warm"] < out["first_step_s_cold"] / 2 and out["launch_s_warm"] < out["launch_s_cold"]
    assert 0 < out["first_step_s_cold"] < out["launch_s_cold"] and 0 < out["cache_mib"] < 16  # MiB, not KiB
    # sample.py's own time: it compiles less than launch.py, and reads that from the cache too.
    assert 0 < out["sample_s_warm"] < out["sample_s_cold"] < out["launch_s_cold"]


def test_sample_throughput_times_the_tokens_it_asked_for_with_and_without_the_cache():
    result = subprocess.run([sys.executable, "benchmarks/sample_throughput.py", CONFIG, "--model.n_layer=1",
                             "--num_samples=2", "--max_new_tokens=200"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert (out["num_samples"], out["max_new_tokens"], out["overrides"]) == (2, 200, ["--model.n_layer=1"])
    assert out["cached_tokens_per_sec"] > 0 and out["recompute_tokens_per_sec"] > 0
    assert out["speedup"] == pytest.approx(out["cached_tokens_per_sec"] / out["recompute_tokens_per_sec"])
    # Each token recomputed over a window of 64 against one token's step with the cache: 6.2x measured, and 1x
    # were one path timed twice.
    assert out["speedup"] > 2, out


def benchmark(name: str, monkeypatch):
    """A script of benchmarks/ as a module, its own imports found as when it runs."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    return importlib.import_module(name)


def test_sample_throughput_counts_every_samples_tokens_and_leaves_the_compile_out(monkeypatch):
    calls = []

    def generate(model, prompt_BxP, max_new_tokens, key):  # its first call compiles
        calls.append(max_new_tokens)
        time.sleep(0.5 if len(calls) == 1 else 0.1)
        return np.zeros(1)

    rate = benchmark("sample_throughput", monkeypatch).tokens_per_sec(generate, None, np.zeros((3, 1)), 20, None)
    assert calls == [20, 20] and 300 < rate <= 3 * 20 / 0.1


def test_prepare_benchmark_counts_every_document_and_token_of_its_corpus(tmp_path, monkeypatch):
    benchmark("prepare_openwebtext", monkeypatch).write_corpus(str(tmp_path / "corpus.txt"), 1)  # as --sizes_mb 1 does
    docs = [doc for doc in (tmp_path / "corpus.txt").read_text().split("\n\n") if doc]
    result = subprocess.run([sys.executable, "benchmarks/prepare_openwebtext.py", "--sizes_mb", "1", "--num_proc", "1",
                             "--val_fraction", "0.1"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["documents"] == len(docs) and out["tokens"] == sum(len(gpt2().encode_ordinary(d)) + 1 for d in docs)
    assert out["tokens_per_sec"] == pytest.approx(out["tokens"] / out["seconds"], rel=0.01)
    assert out["peak_rss_mb"] == max(out["parent_peak_rss_mb"], out["worker_peak_rss_mb"]) > 0
