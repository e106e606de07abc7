"""Shared fixtures: a Tiny Shakespeare text file and a directory prepared from it."""

import http.client
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
import warnings
from pathlib import Path

import jax
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # The tests start launch.py, sample.py and the benchmarks about a hundred times, mostly on the same
    # small programs: those processes share XLA's compilation cache (pytest-xdist's workers inherit it
    # from their controller). The tests' own compiles, whose memory_analysis they read, stay uncached.
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        config._midgpt_xla_cache = tempfile.mkdtemp(prefix="midgpt-xla-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = config._midgpt_xla_cache
        # Every program, however fast it compiles: launch.py and sample.py keep them so themselves, the
        # benchmarks (which the tests start too) would keep only those of JAX's default second.
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        # A size limit turns on JAX's file lock around each entry: unlocked, an entry is written in
        # place, and a process of the other test worker could read it half-written.
        os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(64 << 30)
    jax.config.update("jax_enable_compilation_cache", False)
    # An ignored signal stays ignored across exec, and launch.py keeps it so (nohup's SIGHUP): a suite
    # started under nohup, or as a script's background job, would see no run stop at the signals it sends.
    for sig in (signal.SIGINT, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)
    # Most of the tests' own programs are small and compiled once: compiling is nearly all their time,
    # and LLVM's optimisations double it. launch.py's runs, in subprocesses, keep them (see optimized).
    jax.config.update("jax_disable_most_optimizations", True)


def pytest_unconfigure(config):
    if cache := getattr(config, "_midgpt_xla_cache", None):
        shutil.rmtree(cache, ignore_errors=True)


def this_tree_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python that imports this tree's midgpt, not an installed one's."""
    path = os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **extra}


def small_files(kib: int | None) -> list[str]:
    """A command prefix under which a write past kib KiB fails (File too large), as on a full disk.

    None sets no limit yet: the test sets one on the running process (resource.prlimit).
    """
    # Set by the shell: a preexec_fn would fork the multithreaded test process. SIGXFSZ ignored, the
    # write fails instead of killing. No compilation cache: JAX writes an entry in place, and one cut
    # short would add a note to a later process's output.
    limit = f"ulimit -f {kib} && " if kib is not None else ""
    return ["bash", "-c", f'{limit}trap "" XFSZ && JAX_ENABLE_COMPILATION_CACHE=false exec "$@"', "bash"]


PREPARE = REPO_ROOT / "data" / "shakespeare_char" / "prepare.py"
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def _synthetic_text(n_chars: int = 300_000) -> str:
    """Deterministic English-like stand-in for Tiny Shakespeare."""
    rng = random.Random(0)
    words = ("the king queen lord lady good night fair sweet love death crown sword "
             "speak hear what say you my thy thou art is not and of to in this").split()
    speakers = ["FIRST CITIZEN", "MENENIUS", "ROMEO", "JULIET", "KING RICHARD"]
    parts, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
        part = f"{rng.choice(speakers)}:\n{line.capitalize()}{rng.choice('.,?!;')}\n\n"
        parts.append(part)
        size += len(part)
    return "".join(parts)


@pytest.fixture(scope="session")
def shakespeare_text(tmp_path_factory) -> str:
    """Path to Tiny Shakespeare: $MIDGPT_TINYSHAKESPEARE, ../shared/data, a download, or synthetic text."""
    if os.environ.get("MIDGPT_TINYSHAKESPEARE"):
        return os.environ["MIDGPT_TINYSHAKESPEARE"]
    shared = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    if shared.is_file():
        return str(shared)
    path = tmp_path_factory.mktemp("text") / "tinyshakespeare.txt"
    try:
        with urllib.request.urlopen(URL, timeout=10) as response:
            path.write_bytes(response.read())
        return str(path)
    except (OSError, http.client.HTTPException):  # a cut connection is IncompleteRead, not an OSError
        pass
    # Synthetic text keeps every data invariant testable offline; only realism is lost.
    warnings.warn("Tiny Shakespeare not found or downloadable; tests use synthetic text "
                  "(set MIDGPT_TINYSHAKESPEARE to a local copy)")
    path.write_text(_synthetic_text())
    return str(path)


def one_layer_config(data_dir: str, *overrides: str):
    """shakespeare_char_cpu cut to one layer 32 wide and batches of 4, on data_dir's data, then overrides: a train()
    of a few steps takes seconds."""
    from midgpt.config import apply_overrides, load_config

    return apply_overrides(load_config("shakespeare_char_cpu"), [
        f"--data_dir={data_dir}", "--model.n_layer=1", "--model.n_embd=32", "--model.n_head=2", "--batch_size=4",
        *overrides])


@pytest.fixture(scope="session")
def shakespeare_data_dir(shakespeare_text, tmp_path_factory) -> str:
    """Directory holding train.bin, val.bin and meta.json made by a real prepare.py run."""
    out_dir = tmp_path_factory.mktemp("shakespeare_char")
    result = subprocess.run(
        [sys.executable, str(PREPARE), "--input", shakespeare_text, "--out_dir", str(out_dir)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    return str(out_dir)


@pytest.fixture
def optimized():
    """Compile as launch.py does, for a test that times what it runs."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    # GPUs run float32 matmuls as TF32 by default; the tests compare two orders of
    # the same float32 computation, so they ask for full precision everywhere.
    with jax.default_matmul_precision("highest"):
        yield
