"""Runs that survive: real processes, real signals, real damaged files; resumed runs are bit-identical."""

import dataclasses
import json
import math
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, one_layer_config, this_tree_env
from midgpt import data
from midgpt.checkpoint import committed, delete_unfinished_saves, make_manager
from midgpt.config import apply_overrides, load_config, steps_a_call
from midgpt.data import TRAIN_STREAM
from midgpt.errors import MidgptError
from midgpt.train import train

STEPS = 60  # checkpoints at 20, 40 and 60
ARGS = ["--config=shakespeare_char_cpu", "--model.n_layer=2", "--max_steps=60", "--checkpoint_interval=20",
        "--eval_interval=30", "--eval_iters=2", "--log_interval=5", "--model.dropout=0.1"]


def launch(rundir, data_dir, *extra, devices=None, stdout=subprocess.PIPE, stderr=subprocess.PIPE):
    env = dict(os.environ)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.Popen([sys.executable, str(REPO_ROOT / "launch.py"), *ARGS, f"--rundir={rundir}",
                             f"--data_dir={data_dir}", *extra], cwd=REPO_ROOT, env=env,
                            stdout=stdout, stderr=stderr, text=True)


def finish(proc, timeout=600):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # not left training in the background
        raise
    return proc.returncode, (out or "") + (err or "")


def metrics(rundir):
    """metrics.jsonl without its timings."""
    timings = {"tokens_per_sec", "step_ms", "mfu"}
    with open(os.path.join(rundir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in timings} for line in f]


def final_params(rundir, step=STEPS):
    from midgpt.sample import load_model

    _, model = load_model(str(rundir), step)
    return [np.asarray(x) for x in jax.tree.leaves(model) if hasattr(x, "shape")]


def assert_same_run(rundir, reference):
    assert metrics(rundir) == metrics(reference)
    for a, b in zip(final_params(rundir), final_params(reference), strict=True):
        np.testing.assert_array_equal(a, b)  # bitwise, not approximately


@pytest.fixture(scope="module")
def uninterrupted(shakespeare_data_dir, tmp_path_factory):
    rundir = tmp_path_factory.mktemp("uninterrupted") / "run"
    code, output = finish(launch(rundir, shakespeare_data_dir))
    assert code == 0, output
    assert sorted(os.listdir(rundir / "checkpoints"), key=int) == ["20", "40", "60"]
    return rundir


def wait_for_step(rundir, step, proc, timeout=120):
    """Block until metrics.jsonl has logged step (the process is then a little past it)."""
    path, start = os.path.join(rundir, "metrics.jsonl"), time.time()
    while time.time() - start < timeout:
        assert proc.poll() is None, finish(proc)[1]
        if os.path.exists(path) and any(json.loads(line)["step"] >= step for line in open(path) if line.endswith("\n")):
            return
        time.sleep(0.005)
    raise TimeoutError(f"step {step} never logged")


def test_resume_after_kill_matches_uninterrupted_run(uninterrupted, shakespeare_data_dir, tmp_path):
    rundir, deadline = tmp_path / "run", time.time() + 120
    proc = launch(rundir, shakespeare_data_dir)
    wait_for_step(rundir, 45, proc)  # between the checkpoints at 40 and 60
    while not committed(str(rundir), 40):  # its save finishes in the background, in milliseconds
        assert proc.poll() is None and time.time() < deadline, finish(proc)[1]
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(r["step"] for r in metrics(rundir)) < STEPS
    # What a kill in the middle of a save at step 50 (at a stop signal) leaves: orbax's folder before its
    # rename. One of step 60 would be replaced by that step's save anyway.
    shutil.copytree(rundir / "checkpoints" / "40", rundir / "checkpoints" / "50.orbax-checkpoint-tmp")
    code, output = finish(launch(rundir, shakespeare_data_dir))
    assert code == 0, output
    assert "resuming from checkpoint 40" in output
    assert_same_run(rundir, uninterrupted)
    assert sorted(os.listdir(rundir / "checkpoints")) == ["20", "40", "60"]  # the unfinished save deleted


def test_steps_run_one_a_call_train_the_run_that_several_a_call_did(uninterrupted, shakespeare_data_dir, tmp_path):
    # ARGS's intervals cut shakespeare_char_cpu's steps_per_call=10 to 5 in the uninterrupted run; 3 is cut to 1.
    assert steps_a_call(apply_overrides(load_config("shakespeare_char_cpu"), ARGS[1:])) == 5
    code, output = finish(launch(tmp_path / "run", shakespeare_data_dir, "--steps_per_call=3"))
    assert code == 0, output
    assert ("steps_per_call=3 runs 1 at a time: a call ends where the loop logs, evaluates or saves, so it divides "
            "log_interval, eval_interval and checkpoint_interval") in output
    assert_same_run(tmp_path / "run", uninterrupted)


def test_step_k_trains_on_the_batch_of_key_seed_0_k_and_a_resume_goes_on_at_the_next(shakespeare_data_dir, tmp_path,
                                                                                     monkeypatch):
    # Two runs that shift their keys alike resume alike: only this ties a step to the README's batch.
    keys, global_batch = [], data.global_batch
    monkeypatch.setattr(data, "global_batch",
                        lambda tokens, key, *rest: keys.append(key) or global_batch(tokens, key, *rest))
    config = one_layer_config(shakespeare_data_dir, "--max_steps=3", "--eval_interval=100", "--eval_iters=1",
                              "--checkpoint_interval=3")
    trained = lambda: [key for key in keys if len(key) == 3]  # not evaluation's (seed, stream)
    train(config, str(tmp_path))
    assert trained() == [(config.seed, TRAIN_STREAM, step) for step in (1, 2, 3)]
    keys.clear()
    train(dataclasses.replace(config, max_steps=5), str(tmp_path), resume=True)
    assert trained() == [(config.seed, TRAIN_STREAM, step) for step in (4, 5)]


def test_data_prepared_again_as_a_run_starts_is_refused_not_copied_into_the_run(shakespeare_data_dir, tmp_path,
                                                                                monkeypatch):
    # The run maps its tokens, then copies meta.json seconds later: a prepare.py that finished between left the run
    # with the new data's meta.json, and a resume on the new data passed as the run's own.
    data_dir = shutil.copytree(shakespeare_data_dir, tmp_path / "data")
    meta = json.loads((data_dir / "meta.json").read_text())
    (tmp_path / "other.json").write_text(json.dumps({**meta, "sha256": {"train.bin": "0" * 64, "val.bin": "0" * 64}}))
    load_splits = data.load_splits

    def prepared_again_meanwhile(config):
        splits = load_splits(config)
        os.replace(tmp_path / "other.json", data_dir / "meta.json")  # prepare.py's last rename
        return splits

    monkeypatch.setattr(data, "load_splits", prepared_again_meanwhile)
    config = one_layer_config(str(data_dir), "--max_steps=1", "--eval_iters=1")
    refusal = f"^{re.escape(str(data_dir))} was prepared again as this run started; run the same command again$"
    with pytest.raises(MidgptError, match=refusal):
        train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_unfinished_saves_are_deleted_by_the_trainer_alone(tmp_path):
    # A reader's manager leaves them: sample.py may read a run in training. Many files, so that a deletion
    # in the background, as orbax's cleanup_tmp_directories makes, would show.
    unfinished = tmp_path / "checkpoints" / "50.orbax-checkpoint-tmp" / "state"
    unfinished.mkdir(parents=True)
    for i in range(3000):
        (unfinished / f"d{i}").write_bytes(b"x")
    (tmp_path / "checkpoints" / "40").mkdir()  # a finished one's folder is kept
    make_manager(str(tmp_path), load_config("shakespeare_char_cpu")).close()
    assert (unfinished / "d2999").exists()
    delete_unfinished_saves(str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == ["40"]


def test_a_second_launch_on_a_run_in_training_stops_in_one_line_and_changes_nothing(shakespeare_data_dir, tmp_path):
    # A job requeued while its first copy still ran: both trained, and the second's rewind dropped the first's metrics.
    rundir = tmp_path / "run"
    first = launch(rundir, shakespeare_data_dir, "--max_steps=100000")
    wait_for_step(rundir, 5, first)
    code, output = finish(launch(rundir, shakespeare_data_dir, "--max_steps=100000"))
    assert code == 1 and output.strip().splitlines() == [(
        f"error: another launch.py is training the run in {rundir}; wait for it to end (or stop it), "
        "or pass another --rundir")], output
    wait_for_step(rundir, 10, first)  # undisturbed
    first.send_signal(signal.SIGTERM)
    code, output = finish(first)
    assert code == 0, output
    steps = [r["step"] for r in metrics(rundir)]
    assert steps == list(range(5, steps[-1] + 1, 5))  # each once, none lost
    before = {p: p.read_bytes() for p in rundir.rglob("*") if p.is_file()}
    code, output = finish(launch(rundir, shakespeare_data_dir, "--max_steps=1"))  # released at its end
    assert code == 0 and "max_steps=1 is reached" in output, output
    # Nothing to train changes nothing: not config.json's max_steps, nor a TensorBoard file more.
    assert {p: p.read_bytes() for p in rundir.rglob("*") if p.is_file()} == before


def test_sigterm_saves_a_checkpoint_and_exits_0_then_resumes_exactly(uninterrupted, shakespeare_data_dir, tmp_path):
    rundir = tmp_path / "run"
    proc = launch(rundir, shakespeare_data_dir, stderr=subprocess.STDOUT)  # in the order a terminal shows it
    wait_for_step(rundir, 45, proc)
    proc.send_signal(signal.SIGTERM)
    code, output = finish(proc)
    assert code == 0, output
    stopped = int(output.split("stopped after step ")[1].split(" ")[0])
    assert 45 <= stopped < STEPS
    # The last line on the screen, not the progress bar drawn again below it.
    assert re.split(r"[\r\n]+", output.strip())[-1] == (f"stopped after step {stopped} (SIGTERM); run the same "
                                                        f"command to resume from checkpoint {stopped}"), output[-500:]
    assert str(stopped) in os.listdir(rundir / "checkpoints")
    code, output = finish(launch(rundir, shakespeare_data_dir))
    assert code == 0, output
    assert f"resuming from checkpoint {stopped}" in output
    assert_same_run(rundir, uninterrupted)


@pytest.mark.parametrize("streams", ["stdout", "stdout and stderr"])
def test_a_stop_signal_saves_and_exits_0_when_nobody_reads_the_output(shakespeare_data_dir, tmp_path, streams):
    # Ctrl-C in a terminal also ends the `tee` of `launch.py | tee log` (or `2>&1 | tee log`, with the progress
    # bar): the output is a pipe without a reader.
    rundir = tmp_path / "run"
    read_end, write_end = os.pipe()
    stderr = write_end if streams == "stdout and stderr" else subprocess.PIPE
    proc = launch(rundir, shakespeare_data_dir, "--max_steps=100000", stdout=write_end, stderr=stderr)
    os.close(write_end)
    wait_for_step(rundir, 5, proc)
    os.close(read_end)
    proc.send_signal(signal.SIGINT)
    code, errors = finish(proc, timeout=120)
    assert code == 0, errors
    [saved] = os.listdir(rundir / "checkpoints")
    assert int(saved) >= 5 and "Error" not in errors, errors


def test_a_stop_during_an_evaluation_says_it_waits_for_the_evaluation(shakespeare_data_dir, tmp_path):
    # shakespeare_char's evaluation takes minutes on a CPU, and the notice said "after this step".
    rundir = tmp_path / "run"
    proc = launch(rundir, shakespeare_data_dir, "--max_steps=100000", "--eval_interval=1", "--eval_iters=100",
                  stderr=subprocess.STDOUT)
    for line in proc.stdout:  # step 1's evaluation (its compile, then 200 batches: seconds) follows this line
        if line.startswith("step 1 (compile included)"):
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            break
    code, output = finish(proc, timeout=300)
    assert code == 0 and "SIGINT: stopping after this step's evaluation, with a checkpoint" in output, output
    assert os.listdir(rundir / "checkpoints") == ["1"] and metrics(rundir)[-1]["val_loss"] > 0


def test_a_closed_terminal_saves_and_exits_0(shakespeare_data_dir, tmp_path):
    # A closed terminal or ssh session: SIGHUP, and every later write to the terminal fails (EIO).
    # SIGHUP's default ended the run at once, without a checkpoint of the steps since the last.
    rundir = tmp_path / "run"
    terminal, run_side = pty.openpty()
    proc = launch(rundir, shakespeare_data_dir, "--max_steps=100000", stdout=run_side, stderr=run_side)
    os.close(run_side)
    reading = threading.Event()
    reading.set()

    def read_terminal():  # as a terminal does: a full one would block the run's writes
        while reading.is_set():
            if select.select([terminal], [], [], 0.05)[0]:
                os.read(terminal, 1 << 16)

    reader = threading.Thread(target=read_terminal)
    reader.start()
    try:
        wait_for_step(rundir, 5, proc)
    finally:
        reading.clear()
        reader.join()
    os.close(terminal)
    proc.send_signal(signal.SIGHUP)
    assert finish(proc, timeout=120)[0] == 0
    [saved] = os.listdir(rundir / "checkpoints")
    assert int(saved) >= 5


def test_a_signal_the_run_was_started_ignoring_stays_ignored(shakespeare_data_dir, tmp_path):
    # nohup ignores SIGHUP, and a script's background job SIGINT: the run took them, and stopped at logout.
    rundir = tmp_path / "run"
    ignoring = ["bash", "-c", 'trap "" HUP INT && exec "$@"', "bash", sys.executable, str(REPO_ROOT / "launch.py")]
    proc = subprocess.Popen([*ignoring, *ARGS, f"--rundir={rundir}", f"--data_dir={shakespeare_data_dir}",
                             "--max_steps=30"], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_step(rundir, 5, proc)
    proc.send_signal(signal.SIGHUP)
    proc.send_signal(signal.SIGINT)
    code, output = finish(proc, timeout=120)
    assert code == 0 and "trained to step 30" in output and "stopp" not in output, output


def test_a_stop_signal_before_the_first_step_is_heard_too(shakespeare_data_dir, tmp_path):
    # Alone, it used to kill the run; under jax.distributed, JAX's own handler noted it and training went on.
    # Without --rundir (a run in outputs/<timestamp>), "run the same command" would have started another run.
    command = [sys.executable, str(REPO_ROOT / "launch.py"), *ARGS, f"--data_dir={shakespeare_data_dir}"]
    proc = subprocess.Popen([*command, "--max_steps=100000"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("config:"):  # training has begun: the data check, then the memory plan and compile
            break
    proc.send_signal(signal.SIGTERM)
    code, output = finish(proc, timeout=120)
    [rundir] = os.listdir(tmp_path / "outputs")
    # After the first call: steps 1-5, five a call (ARGS's log_interval).
    assert code == 0 and "SIGTERM: stopping after the steps under way, with a checkpoint" in output, output
    assert (f"stopped after step 5 (SIGTERM); run the same command with --rundir=outputs/{rundir} "
            "to resume from checkpoint 5") in output, output
    assert os.listdir(tmp_path / "outputs" / rundir / "checkpoints") == ["5"]
    code, output = finish(subprocess.Popen([*command, "--max_steps=6", f"--rundir=outputs/{rundir}"], cwd=tmp_path,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    assert code == 0 and "resuming from checkpoint 5" in output, output


# launch.py, signalled just as it imports a module: JAX (the second of its start when a Ctrl-C is likeliest).
SIGNALLED_AT_IMPORT = """
import os, runpy, signal, sys
class SignalAtImport:
    def find_spec(self, name, path=None, target=None):
        if name == "{module}":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.{sig})
sys.meta_path.insert(0, SignalAtImport())
sys.argv[0] = "launch.py"
runpy.run_path("launch.py", run_name="__main__")
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_while_launch_starts_is_heard_as_in_training(shakespeare_data_dir, tmp_path, sig):
    # It was a KeyboardInterrupt's traceback, or, raised in one of JAX's garbage-collection callbacks,
    # dropped: the run trained on to its end.
    rundir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", SIGNALLED_AT_IMPORT.format(sig=sig, module="jax"), *ARGS,
                           f"--rundir={rundir}", f"--data_dir={shakespeare_data_dir}"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"stopped after step 5 ({sig})" in proc.stdout, proc  # the first call's last
    assert "Traceback" not in proc.stderr, proc.stderr
    assert os.listdir(rundir / "checkpoints") == ["5"]


def test_a_ctrl_c_in_launchs_first_imports_ends_it_quietly(tmp_path):
    # Before main's handlers (midgpt's own imports: tensorboardX's is the longest), nothing has started, and
    # nothing is lost: it was a KeyboardInterrupt's traceback.
    proc = subprocess.run([sys.executable, "-c", SIGNALLED_AT_IMPORT.format(sig="SIGINT", module="tensorboardX"),
                           "--config=shakespeare_char_cpu", f"--rundir={tmp_path}/run"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGINT and proc.stdout == proc.stderr == "", proc
    assert not (tmp_path / "run").exists()


def truncate_data_file(step_dir):
    data = max((os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs if "/d" in d), key=os.path.getsize)
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)


def delete_data_files(step_dir):
    for d, _, files in os.walk(step_dir):
        for f in files:
            if "/d" in d:
                os.remove(os.path.join(d, f))


def change_values_in_place(step_dir):
    # Same files, same sizes: what a bad disk or a stray write leaves, and tensorstore reads without a word.
    data = max((os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs if "/d" in d), key=os.path.getsize)
    with open(data, "r+b") as f:
        f.seek(os.path.getsize(data) // 2)
        chunk = f.read(64)
        f.seek(-len(chunk), os.SEEK_CUR)
        f.write(bytes(b ^ 0x5A for b in chunk))


def remove_commit_marker(step_dir):
    os.remove(os.path.join(step_dir, "commit_success.txt"))


def test_a_fingerprint_changes_with_any_one_value_or_an_order():
    from midgpt.checkpoint import fingerprint_dict

    rng = np.random.default_rng(0)
    tree = {"w": rng.normal(size=(64, 48)).astype(np.float32), "step": np.int32(7),
            "h": rng.normal(size=(5, 3)).astype(jax.numpy.bfloat16)}
    before = fingerprint_dict(tree)
    assert fingerprint_dict(tree) == before and list(before) == ["h", "step", "w"]
    changed = []
    # One bit of one value: the lowest (one ulp), or the top (a sign), which an even weight would shift out.
    for name, at, bit in [("w", (10, 3), 0), ("h", (4, 2), 0), ("w", (0, 1), 31), ("h", (0, 1), 15)]:
        edited = {**tree, name: tree[name].copy()}
        edited[name].view(np.uint32 if name == "w" else np.uint16)[at] ^= 1 << bit
        changed.append(fingerprint_dict(edited))
    changed.append(fingerprint_dict({**tree, "w": tree["w"][::-1]}))  # the same values, rows in another order
    changed.append(fingerprint_dict({**tree, "step": np.int32(8)}))
    assert all(c != before for c in changed)


def copy_of_the_one_before(step_dir):  # resumed as named, step 41 on had 20 steps' learning rate
    shutil.rmtree(step_dir)
    shutil.copytree(os.path.join(os.path.dirname(step_dir), str(int(os.path.basename(step_dir)) - 20)), step_dir)


@pytest.mark.parametrize("damage", [truncate_data_file, delete_data_files, change_values_in_place,
                                    remove_commit_marker, copy_of_the_one_before])
def test_damaged_newest_checkpoint_is_skipped_and_kept(damage, uninterrupted, shakespeare_data_dir, tmp_path):
    rundir = tmp_path / "run"
    shutil.copytree(uninterrupted, rundir)
    damage(str(rundir / "checkpoints" / "60"))
    code, output = finish(launch(rundir, shakespeare_data_dir))
    assert code == 0, output
    damaged_lines = [line for line in output.splitlines() if "checkpoint 60 is damaged" in line]
    assert len(damaged_lines) == 1
    assert "Encountered error" not in damaged_lines[0]  # what orbax's read error wraps, not its wrapper
    assert output.count("resuming from checkpoint") == 1 and "resuming from checkpoint 40\n" in output  # said once
    assert len(os.listdir(rundir / "checkpoints_damaged")) == 1  # moved aside, not deleted
    assert_same_run(rundir, uninterrupted)  # steps 41-60 were trained again, identically


def test_a_garbled_checkpoint_metadata_file_is_one_short_log_line_and_the_run_resumes(uninterrupted,
                                                                                      shakespeare_data_dir, tmp_path):
    # orbax quotes the file whole in its log, one terminal line for each of the file's (it restores without it).
    rundir = tmp_path / "run"
    shutil.copytree(uninterrupted, rundir)
    (rundir / "checkpoints" / "60" / "_CHECKPOINT_METADATA").write_text(("x" * 100 + "\n") * 50)
    code, output = finish(launch(rundir, shakespeare_data_dir, "--max_steps=65"))
    assert code == 0 and "resuming from checkpoint 60" in output, output
    quoted = [line for line in output.splitlines() if "xxxxxxxxxx" in line]
    assert len(quoted) == 1 and "_CHECKPOINT_METADATA" in quoted[0] and len(quoted[0]) < 350, output


def test_unfinished_saves_alone_are_set_aside_and_the_run_starts_over(uninterrupted, shakespeare_data_dir, tmp_path):
    # Killed during its first save: no checkpoint, so step 0 and a metrics.jsonl that starts again.
    rundir = tmp_path / "run"
    shutil.copytree(uninterrupted, rundir)
    for step in ("20", "40", "60"):
        remove_commit_marker(str(rundir / "checkpoints" / step))
    code, output = finish(launch(rundir, shakespeare_data_dir))
    assert code == 0 and "no checkpoint to resume from: starting at step 0" in output, output
    assert len(os.listdir(rundir / "checkpoints_damaged")) == 3
    assert_same_run(rundir, uninterrupted)


def test_when_no_checkpoint_restores_the_run_stops_and_moves_nothing(uninterrupted, shakespeare_data_dir, tmp_path):
    # Starting over would rewind metrics.jsonl; the cause may be the machine, not the files.
    rundir = tmp_path / "run"
    shutil.copytree(uninterrupted, rundir)
    for step in ("20", "40", "60"):
        truncate_data_file(str(rundir / "checkpoints" / step))
    before = {p: p.read_bytes() for p in sorted(rundir.rglob("*")) if p.is_file()}
    code, output = finish(launch(rundir, shakespeare_data_dir, "--max_steps=80"))
    assert code == 1, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.fullmatch(r"error: no checkpoint in .+ restores \(checkpoint 60: .+; checkpoint 40: "
                                             r".+; checkpoint 20: .+\); nothing was moved .+", errors[0]), output
    assert "Traceback" not in output, output  # nor orbax's abandoned reads, collected at exit
    assert {p: p.read_bytes() for p in sorted(rundir.rglob("*")) if p.is_file()} == before  # nothing touched
    # sample.py reads the parameters only, which one truncated file may have spared: every file, then. As a
    # resume does, it takes the newest that restores; it said to try --step= another, which was damaged too.
    sample = lambda *args: subprocess.run([sys.executable, str(REPO_ROOT / "sample.py"), f"--rundir={rundir}",
                                           "--max_new_tokens=5", *args], capture_output=True, text=True)
    def damage(step: str):
        for d, _, files in os.walk(rundir / "checkpoints" / step):
            for f in files if "/d" in d else []:
                os.truncate(os.path.join(d, f), os.path.getsize(os.path.join(d, f)) // 2)

    for step in ("40", "20"):  # whole again
        shutil.rmtree(rundir / "checkpoints" / step)
        shutil.copytree(os.path.join(uninterrupted, "checkpoints", step), rundir / "checkpoints" / step)
    damage("60")
    sampled = sample()
    assert sampled.returncode == 0, sampled.stderr
    assert re.fullmatch(rf"checkpoint 60 of {rundir} does not restore \(.+\): sampling from checkpoint 40\n",
                        sampled.stderr), sampled.stderr
    asked = sample("--step=60")  # asked for by its step: told which others to ask for
    assert asked.returncode == 1 and re.fullmatch(rf"error: checkpoint 60 of {rundir} does not restore \(.+\); try "
                                                  r"--step= another of \[20, 40\], or none for the newest that "
                                                  r"restores\n", asked.stderr), asked.stderr
    damage("40")
    damage("20")
    for _ in range(3):  # orbax's reads are collected at exit in some runs only
        sampled = sample()
        assert sampled.returncode == 1 and sampled.stderr.count("\n") == 1, sampled.stderr
        assert re.fullmatch(rf"error: no checkpoint of {rundir} restores \(checkpoint 60: .+; checkpoint 40: .+; "
                            r"checkpoint 20: .+\): fix the cause, or train the run again\n", sampled.stderr)


def test_sample_refuses_parameters_whose_values_were_changed_on_disk(uninterrupted, tmp_path):
    # orbax reads whatever values the files hold: the fingerprints saved with the step are what tell.
    rundir = tmp_path / "run"
    shutil.copytree(uninterrupted, rundir)
    # Step 40's arrays in step 60's place, as a stray copy leaves them: every file reads, and holds other values.
    # (Bytes changed in place hit the model's values in some runs only: where orbax writes them varies.)
    shutil.rmtree(rundir / "checkpoints" / "60" / "state")
    shutil.copytree(rundir / "checkpoints" / "40" / "state", rundir / "checkpoints" / "60" / "state")
    sampled = subprocess.run([sys.executable, str(REPO_ROOT / "sample.py"), f"--rundir={rundir}", "--max_new_tokens=5"],
                             capture_output=True, text=True)
    assert sampled.returncode == 0, sampled.stderr
    assert re.fullmatch(rf"checkpoint 60 of {rundir} does not restore \(.+ are not those saved: its files were "
                        r"changed\): sampling from checkpoint 40\n", sampled.stderr), sampled.stderr


def test_sample_skips_a_checkpoint_folder_that_holds_another_steps_state(uninterrupted, tmp_path):
    # A copy of step 40 named 60 was sampled as "checkpoint 60"; a resume refuses it (copy_of_the_one_before).
    rundir = tmp_path / "run"
    shutil.copytree(uninterrupted, rundir)
    copy_of_the_one_before(str(rundir / "checkpoints" / "60"))
    sampled = subprocess.run([sys.executable, str(REPO_ROOT / "sample.py"), f"--rundir={rundir}", "--max_new_tokens=5"],
                             capture_output=True, text=True)
    assert sampled.returncode == 0 and sampled.stderr == (
        f"checkpoint 60 of {rundir} does not restore (ValueError: it holds the state after step 40: a folder renamed, "
        "or copied from another?): sampling from checkpoint 40\n"), sampled.stderr


def test_checkpoint_of_another_model_is_refused_not_taken_for_damage(uninterrupted, shakespeare_data_dir, tmp_path):
    rundir = tmp_path / "run"
    shutil.copytree(uninterrupted, rundir)
    # Checkpoints whose arrays are not the model's, as another version of midgpt would leave them.
    config = json.loads((rundir / "config.json").read_text())
    config["model"]["n_head"] = 2
    for path in [rundir / "config.json", *rundir.glob("checkpoints/*/config/metadata")]:  # its copies agree
        path.write_text(json.dumps(config))
    before = {p: p.read_bytes() for p in sorted(rundir.rglob("*")) if p.is_file()}
    code, output = finish(launch(rundir, shakespeare_data_dir, "--max_steps=80", "--model.n_head=2"))
    assert code == 1, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "checkpoints/60 holds other arrays than this model" in errors[0], output
    assert "model.blocks.attn.k_norm.weight_D: saved (2, 32), this model (2, 64)" in errors[0]
    assert {p: p.read_bytes() for p in sorted(rundir.rglob("*")) if p.is_file()} == before  # nothing touched


# Seen at a log step (every 5), or only by the check before the checkpoint at step 80. A learning rate of
# 1e6 keeps every metric finite, but no gradient moves the parameters it grew; one of 10 keeps them finite and
# moving, the loss in the thousands: both runs trained on, and saved.
@pytest.mark.parametrize("learning_rate, intervals", [("1e12", []),
                                                      ("1e12", ["--log_interval=1000", "--eval_interval=1000"]),
                                                      ("1e6", []), ("10", [])])
def test_divergence_stops_naming_the_step_and_keeps_the_last_checkpoint(learning_rate, intervals, uninterrupted,
                                                                        shakespeare_data_dir, tmp_path):
    rundir = tmp_path / "run"
    shutil.copytree(uninterrupted, rundir)
    code, output = finish(launch(rundir, shakespeare_data_dir, "--max_steps=200", f"--learning_rate={learning_rate}",
                                 *intervals))
    assert code == 1
    assert "resuming the run in" in output and f"learning_rate: 0.001 -> {float(learning_rate)}" in output
    error = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "training diverged" in error[0] and "checkpoint 60 is untouched" in error[0], output
    step = int(error[0].split(" at step ")[1].split(":")[0])
    assert step == 80 if intervals else STEPS < step < 80
    assert sorted(os.listdir(rundir / "checkpoints"), key=int) == ["20", "40", "60"]  # no diverged one
    assert metrics(rundir)[: len(metrics(uninterrupted))] == metrics(uninterrupted)
    for a, b in zip(final_params(rundir), final_params(uninterrupted), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_update_that_diverges_just_before_a_save_is_not_saved(uninterrupted, shakespeare_data_dir, tmp_path):
    # Step 61's loss is of the parameters before its update, which a learning rate of 1e3 took to a loss of 1e6:
    # checkpoint 61 was saved, and every resume from it diverged again however low the learning rate.
    rundir = tmp_path / "run"
    shutil.copytree(uninterrupted, rundir)
    code, output = finish(launch(rundir, shakespeare_data_dir, "--max_steps=61", "--learning_rate=1e3"))
    error = [line for line in output.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(error) == 1 and error[0].startswith("error: train_loss is "), output
    assert "at step 61: training diverged" in error[0] and "checkpoint 60 is untouched" in error[0], output
    assert sorted(os.listdir(rundir / "checkpoints"), key=int) == ["20", "40", "60"]


@pytest.mark.parametrize("failure, advice", [
    ("diverged", "loss is nan at step 3: training diverged; checkpoint 2 is untouched: lower --learning_rate and run "
                 "the same command to resume from it"),
    ("out of memory", "use more devices, and run the same command with one of them to resume from checkpoint 2; or, "
                      "in a new --rundir, a smaller batch with more accumulation"),
])
def test_a_new_run_that_fails_after_its_first_save_is_told_to_resume_from_it(shakespeare_data_dir, tmp_path,
                                                                             monkeypatch, failure, advice):
    # Not to start again, as before the save; nor, once saved, to resume with a smaller batch, which a resume refuses.
    from midgpt import train as training

    make_train_step = training.make_train_step

    def failing_at_step_3(*args, **kwargs):  # the real step, but for its third call
        step, calls = make_train_step(*args, **kwargs), []

        def failing(state, x, y):
            calls.append(None)
            if len(calls) == 3 and failure == "out of memory":
                raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 5 bytes.")
            state, metrics = step(state, x, y)
            return state, {**metrics, "loss": np.float32("nan")} if len(calls) == 3 else metrics
        return failing

    monkeypatch.setattr(training, "make_train_step", failing_at_step_3)
    config = one_layer_config(shakespeare_data_dir, "--max_steps=4", "--steps_per_call=1", "--log_interval=1",
                              "--checkpoint_interval=2", "--eval_interval=100", "--eval_iters=1")
    with pytest.raises(MidgptError) as error:
        train(config, str(tmp_path))
    assert advice in str(error.value)
    assert os.listdir(tmp_path / "checkpoints") == ["2"]


def test_a_stop_signal_during_a_save_stops_with_that_checkpoint(shakespeare_data_dir, tmp_path, capsys, monkeypatch):
    # It trained on to the next call and saved again: under preemption, a second save in the grace period.
    from midgpt import checkpoint
    from midgpt.cli import StopSignals
    from midgpt.train import train

    config = one_layer_config(shakespeare_data_dir, "--max_steps=12", "--checkpoint_interval=4", "--log_interval=2",
                              "--eval_interval=100", "--eval_iters=1")
    save = checkpoint.save
    with StopSignals() as signals:
        def signalled_during(manager, step, *args):
            save(manager, step, *args)
            signals.received = signals.received or "SIGTERM"  # as its handler records one that came meanwhile

        monkeypatch.setattr(checkpoint, "save", signalled_during)
        train(config, str(tmp_path), signals=signals)
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("stopped after step 4 (SIGTERM); run ") and last.endswith("to resume from checkpoint 4")
    assert os.listdir(tmp_path / "checkpoints") == ["4"]


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
@pytest.mark.parametrize("name", ["loss", "grad_norm", "param_norm"])
def test_a_non_finite_metric_stops_the_run_before_its_checkpoint(name, value):
    # param_norm is the only one of the updated parameters: a finite loss and gradient can still overflow them.
    from midgpt.errors import MidgptError
    from midgpt.train import check_diverged

    metrics = {"loss": 2.0, "grad_norm": 1.0, "param_norm": 30.0}
    check_diverged(metrics, 7, 5, 65)
    check_diverged({**metrics, "loss": 0.0, "param_norm": 0.0}, 7, 5, 65)  # only a zero gradient is dead
    check_diverged({**metrics, "loss": 3 * math.log(65)}, 7, 5, 65)  # a spike, not yet past 3 ln V
    with pytest.raises(MidgptError, match=r"grad_norm is 0.0 at step 7: training diverged \(every gradient is zero: "
                                          r"the parameters grew past where any moves them, to a norm of 30\); "
                                          "checkpoint 5 is untouched"):
        check_diverged({**metrics, "grad_norm": 0.0}, 7, 5, 65)
    with pytest.raises(MidgptError, match=r"loss is 12.53 at step 7: training diverged \(over 3 times the 4.17 of a "
                                          r"uniform guess over 65 tokens\); checkpoint 5 is untouched"):
        check_diverged({**metrics, "loss": 3 * math.log(65) + 0.01}, 7, 5, 65)
    check_diverged({**metrics, "loss": 30.0}, 7, 5, 50304)  # 30 is below 3 ln 50304
    check_diverged({**metrics, "train_loss": 12.0, "val_loss": 12.5}, 7, 5, 65)
    with pytest.raises(MidgptError, match=r"val_loss is 13 at step 7: training diverged \(over 3 times the 4.17"):
        check_diverged({**metrics, "train_loss": 2.0, "val_loss": 13.0}, 7, 5, 65)  # of the parameters it saves
    with pytest.raises(MidgptError, match=f"{name} is {value} at step 7: training diverged; checkpoint 5 is untouched"):
        check_diverged({**metrics, name: value}, 7, 5, 65)
    with pytest.raises(MidgptError, match="training diverged; no checkpoint was written: run the same command with "
                                          "a lower --learning_rate to start again"):
        check_diverged({**metrics, name: value}, 7, None, 65)


def test_checkpoint_saved_on_eight_devices_restores_on_one(shakespeare_data_dir, tmp_path):
    rundir = tmp_path / "run"
    code, output = finish(launch(rundir, shakespeare_data_dir, "--max_steps=20", "--batch_size=16", devices=8))
    assert code == 0, output
    dump = tmp_path / "eight.npz"
    script = f"""
import jax, numpy as np
from midgpt.rundir import read_config_json
from midgpt.optimizer import make_optimizer
from midgpt.sharding import make_mesh
from midgpt.step import fresh_state, state_layout
from midgpt import checkpoint
import equinox as eqx
config = read_config_json("{rundir}")
optimizer, mesh = make_optimizer(config), make_mesh(config)
shardings, _ = state_layout(config, optimizer, mesh)
like = eqx.filter_eval_shape(fresh_state, config, optimizer)
state = checkpoint.restore(checkpoint.make_manager("{rundir}", config), 20, like, shardings)
assert state.model.blocks.mlp.w_in_DxF.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp")
np.savez("{dump}", *[np.asarray(x) for x in jax.tree.leaves(state.model) if hasattr(x, "shape")])
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    eight = np.load(dump)
    one = final_params(rundir, step=20)
    assert len(one) == len(eight.files)
    for i, leaf in enumerate(one):
        np.testing.assert_array_equal(eight[f"arr_{i}"], leaf)

    # A resume keeps batch_size=16, so advising another batch (as for a new run) would be refused.
    before = sorted(os.listdir(rundir)), os.path.getsize(rundir / "metrics.jsonl")
    code, output = finish(launch(rundir, shakespeare_data_dir, "--max_steps=40", "--batch_size=16", devices=3))
    assert code == 1 and output.strip().splitlines()[-1] == (
        "error: this run's batch_size=16 does not split over the 3 devices of the mesh; "
        "resume it on a device count that divides 16 (1, 2, 4, 8 or 16)"), output
    # A fixed mesh_shape entry rules out the counts it does not divide, or all of them.
    for shape, advice in [("2,-1", "and that mesh_shape=2,-1 fits (2, 4, 8 or 16), or pass another --mesh_shape"),
                          ("2,3", "(1, 2, 4, 8 or 16) with another --mesh_shape, e.g. --mesh_shape=1,-1")]:
        code, output = finish(launch(rundir, shakespeare_data_dir, "--max_steps=40", f"--mesh_shape={shape}",
                                     devices=6))
        assert code == 1 and output.strip().splitlines()[-1] == (
            "error: this run's batch_size=16 does not split over the 6 devices of the mesh; "
            f"resume it on a device count that divides 16 {advice}"), output
    assert (sorted(os.listdir(rundir)), os.path.getsize(rundir / "metrics.jsonl")) == before


def test_second_interrupt_stops_at_once(shakespeare_data_dir, tmp_path):
    rundir = tmp_path / "run"
    # Steps of about half a second, so the second signal comes while the first one's step runs.
    proc = launch(rundir, shakespeare_data_dir, "--max_steps=100000", "--model.n_embd=512", "--batch_size=64")
    wait_for_step(rundir, 5, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)  # two within 0.1 s count as one: a Ctrl-C that came from the terminal and a wrapper
    proc.send_signal(signal.SIGINT)
    code, output = finish(proc)
    assert code == 128 + signal.SIGINT, output
    assert "SIGINT again: stopping now, without a checkpoint" in output


WAITING_IN_CPP = """
import os, signal, sys, threading, time
import jax, jax.numpy as jnp
from midgpt import cli
x_NxN = jnp.ones((1024, 1024)) / 1024
matmuls = jax.jit(lambda x_NxN, n: jax.lax.fori_loop(0, n, lambda i, y_NxN: y_NxN @ x_NxN, x_NxN))
matmuls(x_NxN, 1).block_until_ready()  # compiled, for any n
start = time.perf_counter()
matmuls(x_NxN, 8).block_until_ready()
n = int(8 * 3 / (time.perf_counter() - start)) + 1  # a wait of about 3 s, on any machine
def interrupt_twice():
    time.sleep(0.3)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(float(sys.argv[1]))
    os.kill(os.getpid(), signal.SIGINT)
waiting = True
with cli.StopSignals() as signals:
    signals.speak(lambda line: print(("during" if waiting else "after") + f" the wait: {line}", flush=True),
                  "after this step")
    y_NxN = matmuls(x_NxN, n)
    threading.Thread(target=interrupt_twice).start()
    float(y_NxN[0, 0])  # as the loop waits at a log step, or an evaluation (block_until_ready runs handlers)
    waiting = False
    print(f"the wait ended first; {signals.received} received")
"""


@pytest.mark.parametrize("gap_s", [0.3, 0.001])
def test_two_interrupts_during_a_wait_in_cpp_stop_at_once_unless_they_come_as_one(gap_s):
    # Python runs a handler only between bytecodes, so it ran once for both, after the wait: the
    # run went on to the next checkpoint. Two a millisecond apart are one Ctrl-C passed on twice.
    # The first is answered at once, not after the wait (a compile can take minutes).
    env = this_tree_env()
    result = subprocess.run([sys.executable, "-c", WAITING_IN_CPP, str(gap_s)], env=env, capture_output=True,
                            text=True, timeout=120)
    noticed = "during the wait: SIGINT: stopping after this step, with a checkpoint (again to stop at once)\n"
    if gap_s > 0.1:
        assert result.returncode == 128 + signal.SIGINT, result
        assert result.stderr.strip() == "SIGINT again: stopping now, without a checkpoint", result
        assert result.stdout == noticed, result
    else:
        assert result.returncode == 0 and result.stdout == noticed + "the wait ended first; SIGINT received\n", result


def test_a_signal_another_library_handles_asks_for_no_stop_and_a_stop_is_noticed_once():
    from midgpt import cli

    other = signal.signal(signal.SIGUSR1, lambda *args: None)  # a library's own signal
    try:
        with cli.StopSignals() as signals:
            said = []
            signals.speak(said.append, "after this step")
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.2)  # the thread that counts signals has read it
            assert signals.received is None and said == []
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            assert signals.notice() is None  # the thread said it: the loop's check says nothing more
        assert said == ["SIGTERM: stopping after this step, with a checkpoint (again to stop at once)"]
    finally:
        signal.signal(signal.SIGUSR1, other)


def test_a_signal_is_recorded_even_where_a_library_took_the_wakeup_fd():
    from midgpt import cli

    before = signal.getsignal(signal.SIGTERM), signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(before[1])
    with cli.StopSignals() as signals:
        signal.set_wakeup_fd(-1)  # as asyncio's loop.close() does: the counting thread hears nothing
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs at the next bytecode
        assert signals.received == "SIGTERM"
    assert (signal.getsignal(signal.SIGTERM), signal.set_wakeup_fd(before[1])) == before  # as they were


def test_a_failed_restore_is_described_in_one_short_line_cut_between_words():
    from midgpt.checkpoint import describe

    assert describe(ValueError("")) == "ValueError: no detail"  # orbax raised some without text
    assert describe(OSError("short\ntraceback lines")) == "OSError: short"
    message = "tensorstore could not read the chunk " * 10
    said = describe(ValueError(message)).removeprefix("ValueError: ")
    assert said.endswith(" ...") and len(said) <= 164 and message.startswith(said.removesuffix(" ...") + " ")
    path = "/runs/" + "x" * 300  # no space to cut at: cut anyway
    assert describe(FileNotFoundError(path)) == "FileNotFoundError: " + path[:160] + " ..."


@pytest.mark.parametrize("max_steps", [1, 3])
def test_a_stop_signal_in_the_last_step_lets_the_run_finish(shakespeare_data_dir, tmp_path, capsys, max_steps):
    # Stopped there, it said "run ... to resume from checkpoint 1", a resume with nothing to train.
    from midgpt.cli import StopSignals
    from midgpt.train import train

    config = one_layer_config(shakespeare_data_dir, f"--max_steps={max_steps}", "--eval_iters=1")
    with StopSignals() as signals:
        signals.received = "SIGTERM"  # as its handler records one that came during step 1
        train(config, str(tmp_path), signals=signals)
    last = capsys.readouterr().out.splitlines()[-1]
    if max_steps == 1:
        assert last == f"trained to step 1: checkpoint 1 in {tmp_path}/checkpoints; python sample.py " \
                       f"--rundir={tmp_path} samples from it"
    else:
        assert last.startswith("stopped after step 1 (SIGTERM); run ") and last.endswith("to resume from checkpoint 1")
    assert os.listdir(tmp_path / "checkpoints") == ["1"]


def test_a_resume_says_the_learning_rate_it_goes_on_at_and_where_the_schedule_ends(uninterrupted, shakespeare_data_dir,
                                                                                   tmp_path):
    # Extending a run with a longer lr_decay_steps stretches its cosine: the rate rose again, unsaid.
    import dataclasses

    from test_optimizer import closed_form_lr

    rundir = tmp_path / "run"
    shutil.copytree(uninterrupted, rundir)
    extend = ["--max_steps=70", "--lr_decay_steps=65", "--warmup_steps=10"]
    code, output = finish(launch(rundir, shakespeare_data_dir, *extend))
    assert code == 0, output
    config = dataclasses.replace(load_config("shakespeare_char_cpu"), max_steps=70, lr_decay_steps=65, warmup_steps=10)
    lr = closed_form_lr(config, STEPS)
    assert "\nfrom step 66 on, min_lr=0.0001: the cosine ends at lr_decay_steps=65\n" in output, output
    # Steps 61-65 in one call, five a call: the rate is step 61's.
    assert re.search(rf"\nsteps 61-65 \(compile included\) took [0-9.]+ s, from learning rate "
                     rf"{re.escape(f'{lr:.3g}')}\n", output), output
    assert [r["lr"] for r in metrics(rundir) if r["step"] == 65] == [pytest.approx(closed_form_lr(config, 64))]


def test_a_stop_of_a_debug_run_promises_no_checkpoint(shakespeare_data_dir, tmp_path, capsys):
    from midgpt.cli import StopSignals
    from midgpt.train import train

    config = one_layer_config(shakespeare_data_dir, "--max_steps=3", "--eval_iters=1")
    with StopSignals() as signals:
        signals.received = "SIGINT"  # as its handler records one that came before training
        train(config, str(tmp_path), debug=True, signals=signals)
    out = capsys.readouterr().out
    # Not "with a checkpoint"; shakespeare_char_cpu runs 10 steps a call, but these 3 run one at a time.
    assert "SIGINT: stopping after the steps under way (again to stop at once)\n" in out, out
    assert out.splitlines()[-1] == "stopped after step 1 (SIGINT); no checkpoint was written (--debug)"


def test_a_debug_run_stopped_inside_its_traced_steps_still_writes_the_trace(shakespeare_data_dir, tmp_path, capsys,
                                                                            monkeypatch):
    # The trace started at step 3 was never stopped, so never written, and nothing said so.
    import jax

    from midgpt.cli import StopSignals
    from midgpt.train import train

    config = one_layer_config(shakespeare_data_dir, "--max_steps=10", "--eval_iters=1")
    with StopSignals() as signals:
        start_trace = jax.profiler.start_trace
        def start_and_stop(*args, **kwargs):  # a Ctrl-C in step 3, the first traced one
            start_trace(*args, **kwargs)
            signals.received = "SIGINT"
        monkeypatch.setattr(jax.profiler, "start_trace", start_and_stop)
        train(config, str(tmp_path), debug=True, signals=signals)
    out = capsys.readouterr().out
    assert f"debug: the profiler trace stopped early, after step 3 of steps 3-5, in {tmp_path}/profile" in out, out
    assert out.splitlines()[-1] == "stopped after step 3 (SIGINT); no checkpoint was written (--debug)"
    assert len(list((tmp_path / "profile").rglob("*.xplane.pb"))) == 1


def test_a_debug_run_that_fails_inside_its_traced_steps_still_writes_the_trace(shakespeare_data_dir, tmp_path, capsys,
                                                                               monkeypatch):
    from midgpt import data
    from midgpt.train import train

    global_batch = data.global_batch

    def failing_at_step_4(tokens, key, *args):  # the batch of step 4, made while step 3, the first traced, runs
        if len(key) == 3 and key[2] == 4:
            raise OSError("the data went away")
        return global_batch(tokens, key, *args)

    monkeypatch.setattr(data, "global_batch", failing_at_step_4)
    config = one_layer_config(shakespeare_data_dir, "--max_steps=10", "--eval_iters=1")
    with pytest.raises(OSError, match="the data went away"):
        train(config, str(tmp_path), debug=True)
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == f"debug: the profiler trace stopped early, at an error in step 3 of steps 3-5, " \
                                   f"in {tmp_path}/profile", out
    assert len(list((tmp_path / "profile").rglob("*.xplane.pb"))) == 1
