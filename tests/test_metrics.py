"""What a run reports: TensorBoard curves that survive a resume, MFU in the log and the bar."""

import shutil

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from midgpt.metrics import TAGS
from test_launch import TINY, read_metrics, run


def scalars(rundir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve of the run, as TensorBoard reads it."""
    events = EventAccumulator(str(rundir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def resumed_run(shakespeare_data_dir, tmp_path_factory):
    """30 steps, checkpoints at 20 and 30; 30 is lost, as in a crash; resumed to 40."""
    rundir = tmp_path_factory.mktemp("runs") / "tb"
    args = ["--config=shakespeare_char_cpu", f"--rundir={rundir}", f"--data_dir={shakespeare_data_dir}",
            "--eval_interval=20", "--checkpoint_interval=20", *TINY]
    first = run("launch.py", *args, "--max_steps=30")
    assert first.returncode == 0, first.stderr
    before = scalars(rundir)
    shutil.rmtree(rundir / "checkpoints" / "30")
    second = run("launch.py", *args, "--max_steps=40")
    assert second.returncode == 0, second.stderr
    return rundir, before, first, second


def test_event_files_hold_every_metric_at_its_steps(resumed_run):
    rundir, before, first, _ = resumed_run
    log_steps, eval_steps = [5, 10, 15, 20, 25, 30], [20, 30]
    assert set(before) == set(TAGS.values()) - {"perf/peak_memory_gib"}  # CPUs report no peak memory
    for tag, points in before.items():
        assert [step for step, _ in points] == (eval_steps if tag.startswith("eval/") else log_steps), tag
    # The curves are the log's numbers.
    for record in read_metrics(rundir)[:4]:
        assert dict(before["train/loss"])[record["step"]] == pytest.approx(record["loss"])
    assert all(0 < mfu < 1 for _, mfu in before["perf/mfu"])


def test_a_resumed_run_continues_the_curves_without_going_back(resumed_run):
    rundir, before, _, second = resumed_run
    assert "resuming from checkpoint 20" in second.stdout + second.stderr
    after = scalars(rundir)
    assert [step for step, _ in after["train/loss"]] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [step for step, _ in after["eval/val_loss"]] == [20, 40]  # 30 ended only the first attempt
    # Steps up to the checkpoint keep the first run's values; resume is exact, so 25 and 30 agree too.
    assert after["train/loss"][:6] == before["train/loss"]


def test_progress_bar_shows_mfu_and_the_peak_it_uses(resumed_run):
    _, _, first, _ = resumed_run
    output = first.stdout + first.stderr
    assert "MFU is against the measured bfloat16 matmul peak of this cpu" in output  # no table entry for CPUs
    assert "mfu=" in output and "tok/s=" in output
