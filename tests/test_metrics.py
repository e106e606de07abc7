"""What a run reports: TensorBoard curves that survive a resume, MFU in the log and the bar."""

import json
import os
import re
import shutil
import struct
import sys
import time

import numpy as np
import pytest
from tensorboardX import SummaryWriter
from tqdm import tqdm
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util.tensor_util import make_ndarray

from conftest import one_layer_config
from midgpt import checkpoint, cli, data, mfu, precision
from midgpt.data import EVAL_TRAIN_STREAM, EVAL_VAL_STREAM
from midgpt.errors import MidgptError
from midgpt.metrics import last_step, rewind_events, rewind_jsonl
from midgpt.sharding import make_mesh
from midgpt.model import fresh_model
from midgpt.step import loss_fn
from midgpt.train import evaluate, train
from test_launch import TINY, read_metrics, run


def points(rundir) -> dict[str, list[tuple[int, object]]]:
    """Every point of every curve in the run's event files, by step, as any TensorBoard loader finds them."""
    found = {}
    for path in sorted(rundir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for v in event.summary.value:
                value = v.simple_value if v.HasField("simple_value") else make_ndarray(v.tensor)
                found.setdefault(v.tag, []).append((event.step, value))
    return {tag: sorted(values, key=lambda point: point[0]) for tag, values in found.items()}


# The event files' tags by metrics.jsonl's keys, as README lists them: written out here, not read from
# metrics.TAGS, which these tests check.
README_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "param_norm": "train/param_norm",
               "train_loss": "eval/train_loss", "val_loss": "eval/val_loss", "tokens_per_sec": "perf/tokens_per_sec",
               "step_ms": "perf/step_ms", "mfu": "perf/mfu", "peak_memory_gib": "perf/peak_memory_gib"}


def scalars(rundir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve of the run."""
    return {tag: [(step, float(value)) for step, value in values]
            for tag, values in points(rundir).items() if not tag.startswith("config")}


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
    assert set(before) == set(README_TAGS.values()) - {"perf/peak_memory_gib"}  # CPUs report no peak memory
    for tag, points in before.items():  # the first call (steps 1-5) compiles: not timed
        steps = eval_steps if tag.startswith("eval/") else log_steps[1:] if tag.startswith("perf/") else log_steps
        assert [step for step, _ in points] == steps, tag
    # The curves are the log's numbers, each under the tag README names for it (steps 5-20: the resume
    # rewrote the log past 20).
    for record in read_metrics(rundir)[:4]:
        for key in record.keys() - {"step"}:
            assert dict(before[README_TAGS[key]])[record["step"]] == pytest.approx(record[key]), key
    assert all(0 < mfu < 1 for _, mfu in before["perf/mfu"])


def test_a_resumed_run_continues_the_curves_without_going_back(resumed_run):
    rundir, before, _, second = resumed_run
    assert "resuming from checkpoint 20" in second.stdout + second.stderr
    after = scalars(rundir)
    assert [step for step, _ in after["train/loss"]] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [step for step, _ in after["eval/val_loss"]] == [20, 40]  # 30 ended only the first attempt
    # Steps up to the checkpoint keep the first run's values; resume is exact, so 25 and 30 agree too.
    assert after["train/loss"][:6] == before["train/loss"]
    # Each attempt's config, at the step it started from: the resume's shows its max_steps.
    configs = points(rundir)["config/text_summary"]
    assert [step for step, _ in configs] == [0, 20]
    assert '"max_steps": 30' in str(configs[0][1]) and '"max_steps": 40' in str(configs[1][1])


def test_progress_bar_shows_mfu_and_the_peak_it_uses(resumed_run):
    _, _, first, _ = resumed_run
    output = first.stdout + first.stderr
    dtype = precision.compute_dtype("auto")  # no table entry for CPUs: their peak is measured
    assert f"MFU is against the measured {dtype} matmul peak of this cpu" in output
    assert "mfu=" in output and "tok/s=" in output


def test_progress_bar_shows_the_last_logged_loss_and_rate_timed_or_not(shakespeare_data_dir, tmp_path):
    # Steps 1-5 and 6-10 a call each, then 11 alone, its program's first call and untimed: the bar kept step 10's.
    result = run("launch.py", "--config=shakespeare_char_cpu", f"--rundir={tmp_path}",
                 f"--data_dir={shakespeare_data_dir}", *TINY, "--max_steps=11")
    assert result.returncode == 0, result.stderr
    last = read_metrics(tmp_path)[-1]
    shown = re.findall(r"loss=([0-9.]+), lr=([0-9.e+-]+)", result.stderr)[-1]
    assert last["step"] == 11 and shown == (f"{last['loss']:.4f}", f"{last['lr']:.2e}"), (shown, last)


def record_starts(data: bytes) -> list[int]:
    """Where each record of an events file starts, and where the last ends: length (8 bytes), its crc (4), the
    event, its crc (4)."""
    starts = [0]
    while starts[-1] < len(data):
        starts.append(starts[-1] + 16 + struct.unpack("<Q", data[starts[-1]:starts[-1] + 8])[0])
    return starts


@pytest.mark.parametrize("torn", [7, 3])  # into the event, or its checksum alone
def test_rewinding_event_files_keeps_the_steps_up_to_the_checkpoint_and_drops_a_torn_record(tmp_path, torn):
    with SummaryWriter(str(tmp_path)) as writer:
        writer.add_text("config", "first attempt", 0)
        for step in range(1, 11):
            writer.add_scalar("train/loss", 1 / step, step)
    [path] = tmp_path.glob("events.out.tfevents.*")
    path.write_bytes(path.read_bytes()[:-torn])  # step 10's record cut short by a kill
    (tmp_path / f"{path.name}.tmp").write_bytes(path.read_bytes())  # and a rewrite of it, before its rename
    rewind_events(str(tmp_path), 10)
    assert [step for step, _ in scalars(tmp_path)["train/loss"]] == list(range(1, 10))  # each once
    data = path.read_bytes()
    assert record_starts(data)[-1] == len(data)  # whole records: the next one appends
    inode = path.stat().st_ino
    rewind_events(str(tmp_path), 10)  # nothing to cut: the file is left as it is, not written again
    assert path.stat().st_ino == inode
    rewind_events(str(tmp_path), 5)
    assert [step for step, _ in scalars(tmp_path)["train/loss"]] == [1, 2, 3, 4, 5]
    rewind_events(str(tmp_path), 0)  # started over: not even the config is left
    assert points(tmp_path) == {}


@pytest.mark.parametrize("damage", ["a record's event", "a record's length", "no events file"])
def test_a_damaged_event_file_is_refused_not_cut_at_the_damage(tmp_path, damage):
    # Damage short of the file's end was taken for a kill's tear: the file was cut there, every later event lost.
    with SummaryWriter(str(tmp_path)) as writer:
        for step in range(1, 11):
            writer.add_scalar("train/loss", 1 / step, step)
    [path] = tmp_path.glob("events.out.tfevents.*")
    data = bytearray(path.read_bytes())
    at = record_starts(data)[4]
    if damage == "no events file":  # a file of one's own that the pattern matches
        path, at = tmp_path / "events.out.tfevents.notes", 0
        data = bytearray(b"my notes on this run\n")
    else:
        data[at + (12 if damage == "a record's event" else 1)] ^= 0xFF
    path.write_bytes(data)
    with pytest.raises(MidgptError, match=re.escape(f"{path} is damaged at byte {at} (no TensorBoard record there); "
                                                    f"move it out of {tmp_path}, then resume")):
        rewind_events(str(tmp_path), 5)
    assert path.read_bytes() == data


def test_rewinding_metrics_jsonl_drops_a_torn_line_keeps_a_whole_one_and_refuses_an_edited_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(f'{{"step": {s}, "loss": {1 / s}}}\n' for s in range(1, 8)) + '{"step": 8, "lo')
    with open(path) as follower:  # as `tail -f` reads it: the same file, cut, not a new one renamed over it
        follower.seek(0, os.SEEK_END)
        rewind_jsonl(str(path), 5)
        assert os.fstat(follower.fileno()).st_size == len(path.read_bytes())
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
    path.write_text(path.read_text().replace('{"step": 2', '{"step": 7, "loss": 0}\n{"step": 2'))  # out of order
    rewind_jsonl(str(path), 5)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
    edited = path.read_text().replace('{"step": 3', 'my note\n{"step": 3')
    path.write_text(edited)
    with pytest.raises(MidgptError, match=f"line 3 of {path} is not a metrics record; fix or remove it, then resume"):
        rewind_jsonl(str(path), 4)
    assert path.read_text() == edited
    # Whole but for its newline (an editor's save): a record, kept, where a torn one is dropped.
    path.write_text('{"step": 1}\n{"step": 2}')
    assert last_step(str(path)) == 2
    rewind_jsonl(str(path), 4)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\n{"step": 2}')
    rewind_jsonl(str(path), 1)
    assert path.read_text() == '{"step": 1}\n'
    path.write_bytes(b'{"step": 1}\n{"step": 2, "note": "\xff"}\n')  # not UTF-8: a UnicodeDecodeError, once
    with pytest.raises(MidgptError, match="line 2 of .* is not a metrics record"):
        rewind_jsonl(str(path), 4)


def test_a_resume_that_its_logs_refuse_leaves_config_json_as_it_was(shakespeare_data_dir, tmp_path):
    # config.json was written first, with the refused command's overrides, which the next resume then took as
    # the run's own (a learning rate 5x the run's, said to be "kept").
    overrides = ["--max_steps=4", "--checkpoint_interval=2", "--log_interval=2", "--eval_iters=1"]
    train(one_layer_config(shakespeare_data_dir, *overrides), str(tmp_path))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write("my note\n")
    before = (tmp_path / "config.json").read_bytes()
    refused = one_layer_config(shakespeare_data_dir, *overrides, "--max_steps=6", "--learning_rate=0.005")
    with pytest.raises(MidgptError, match="line 3 of .*metrics.jsonl is not a metrics record"):
        train(refused, str(tmp_path), resume=True)
    assert (tmp_path / "config.json").read_bytes() == before


def test_a_printed_line_clears_the_progress_bar_and_redraws_it_below(capsys):
    # The bar writes through cli.PipeSafe, which tqdm must still take for sys.stderr.
    bar = tqdm(total=10, desc="train", file=cli.PipeSafe(sys.stderr))
    bar.update()
    capsys.readouterr()
    cli.say("step 1: a line")
    out, err = capsys.readouterr()
    bar.close()
    assert out == "step 1: a line\n"
    assert err.startswith("\r ") and "train:  10%" in err  # cleared first, then drawn again


def test_the_evaluations_score_the_final_model_on_their_own_split(shakespeare_data_dir, tmp_path):
    # Nothing else ties val_loss to val.bin: scored on training data, a run would only look better.
    config = one_layer_config(shakespeare_data_dir, "--max_steps=6", "--log_interval=3", "--eval_interval=100",
                              "--eval_iters=2")
    model = train(config, str(tmp_path))
    final, mesh = read_metrics(tmp_path)[-1], make_mesh(config)
    train_tokens, val_tokens = data.load_splits(config)
    score = lambda tokens, stream: evaluate(model, tokens, config, mesh, stream)
    assert final["step"] == 6
    assert final["val_loss"] == pytest.approx(score(val_tokens, EVAL_VAL_STREAM), rel=1e-6)
    assert final["train_loss"] == pytest.approx(score(train_tokens, EVAL_TRAIN_STREAM), rel=1e-6)
    assert final["val_loss"] != pytest.approx(score(train_tokens, EVAL_VAL_STREAM), rel=1e-4)


def test_an_evaluation_is_the_mean_loss_of_eval_iters_batches_of_its_stream_without_dropout(shakespeare_data_dir):
    # With dropout, val_loss would score a noisier model than the one trained, and sampled. The streams keep
    # train_loss's batches apart from val_loss's.
    config = one_layer_config(shakespeare_data_dir, "--model.dropout=0.5", "--eval_iters=3", "--compute_dtype=float32")
    model, mesh = fresh_model(config), make_mesh(config)
    for tokens, stream in zip(data.load_splits(config), (EVAL_TRAIN_STREAM, EVAL_VAL_STREAM)):
        x_ExBxT, y_ExBxT = data.global_batch(tokens, (config.seed, stream), config.eval_iters, config, mesh)
        losses = [float(loss_fn(model, x_BxT, y_BxT)) for x_BxT, y_BxT in zip(x_ExBxT, y_ExBxT)]  # no key: no dropout
        assert evaluate(model, tokens, config, mesh, stream) == pytest.approx(np.mean(losses), rel=1e-5)


@pytest.mark.parametrize("slowed", ["checkpoint save", "evaluation"])
def test_step_ms_leaves_out_saves_and_evaluations(shakespeare_data_dir, tmp_path, monkeypatch, slowed):
    # Each made a second slower: were it counted, the 2 steps logged after it would show >= 500 ms each.
    from midgpt import train as training
    module, name = (checkpoint, "save") if slowed == "checkpoint save" else (training, "evaluate")
    slow = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args: (time.sleep(1.0), slow(*args))[1])
    config = one_layer_config(shakespeare_data_dir, "--max_steps=10", "--log_interval=2", "--checkpoint_interval=4",
                              "--eval_interval=4", "--eval_iters=1", "--g_accum_iters=2")
    train(config, str(tmp_path))
    records = [record for record in read_metrics(tmp_path) if "step_ms" in record]
    timed = [record["step_ms"] for record in records]
    assert len(timed) == 4 and max(timed) < 250, timed  # two steps a call; the first call's compile untimed
    # tokens/s is of every step the call ran: at a step's ms, it makes a step's tokens, of all its micro-batches.
    tokens_per_step = config.g_accum_iters * config.batch_size * config.model.block_size
    assert all(r["tokens_per_sec"] * r["step_ms"] / 1000 == pytest.approx(tokens_per_step, rel=1e-3) for r in records)


def test_step_ms_is_one_steps_share_of_a_call_of_several(shakespeare_data_dir, tmp_path, monkeypatch):
    # Each call of two steps made 0.2 s slower: a step's time is half of it, not all.
    from midgpt import train as training
    make = training.make_train_step

    def slowed(*args):
        train_step = make(*args)
        slow_step = lambda *state_x_y: (time.sleep(0.2), train_step(*state_x_y))[1]
        slow_step.lower = train_step.lower
        return slow_step

    monkeypatch.setattr(training, "make_train_step", slowed)
    config = one_layer_config(shakespeare_data_dir, "--max_steps=8", "--log_interval=2", "--steps_per_call=2",
                              "--eval_interval=100", "--eval_iters=1", "--checkpoint_interval=100")
    train(config, str(tmp_path))
    timed = [record["step_ms"] for record in read_metrics(tmp_path) if "step_ms" in record]
    assert len(timed) == 3 and all(100 <= ms < 200 for ms in timed), timed  # steps 3-4, 5-6, 7-8


def test_the_first_call_of_each_program_is_left_out_of_the_timing(shakespeare_data_dir, tmp_path, capsys):
    # Two steps a call where they fit, else one: each program's first call compiles it (or loads it from the
    # cache), in seconds against milliseconds a step, so the log step after it reads no speed.
    overrides = ["--log_interval=2", "--eval_interval=100", "--eval_iters=1", "--checkpoint_interval=100"]
    train(one_layer_config(shakespeare_data_dir, "--max_steps=5", *overrides), str(tmp_path))  # 1-2, 3-4, 5
    said = capsys.readouterr().out
    train(one_layer_config(shakespeare_data_dir, "--max_steps=12", *overrides), str(tmp_path), resume=True)
    said += capsys.readouterr().out  # the resume from step 5: 6 alone, then 7-8, 9-10, 11-12
    for steps in ("steps 1-2", "step 5", "step 6", "steps 7-8"):
        assert f"\n{steps} (compile included) took " in said, said
    assert [(r["step"], "step_ms" in r) for r in read_metrics(tmp_path)] == [
        (2, False), (4, True), (5, False), (6, False), (8, False), (10, True), (12, True)]


def test_an_mfu_above_100_percent_has_the_peak_measured_again_once(shakespeare_data_dir, tmp_path, monkeypatch, capsys):
    # A CPU's peak measured while another process loaded the host reads low, and MFU, above 100%: impossible.
    measure, measured = mfu.measure_peak, []

    def busy_at_first(dtype, **kwargs):
        measured.append(dtype)
        return 1e6 if len(measured) == 1 else measure(dtype, **kwargs)

    monkeypatch.setattr(mfu, "measure_peak", busy_at_first)
    config = one_layer_config(shakespeare_data_dir, "--max_steps=8", "--log_interval=2", "--eval_interval=100",
                              "--eval_iters=1")
    train(config, str(tmp_path))
    logged = [record["mfu"] for record in read_metrics(tmp_path) if "mfu" in record]
    # Two steps a call, the first call's compile untimed: MFU at steps 4, 6 and 8.
    assert len(measured) == 2 and len(logged) == 3 and all(0 < m < 1 for m in logged), (measured, logged)
    assert "step 4: MFU read above 100% against the peak measured before training, 1e-06 TFLOP/s (the host was " \
           "busier then?); measured again: " in capsys.readouterr().out
