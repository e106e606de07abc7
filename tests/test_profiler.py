"""--debug's trace window: which steps it traces, and a trace still written when the run stops inside it."""

import shutil

import jax
import jax.numpy as jnp
import pytest

from midgpt.profiler import TraceWindow


@pytest.mark.parametrize("start, max_steps, enabled, traced, said", [
    (0, 100, True, range(3, 6), "debug: profiler trace of steps 3-5 in R/profile"),
    (10, 100, True, range(13, 16), "debug: profiler trace of steps 13-15 in R/profile"),  # a resume: after its compile
    (0, 4, True, range(3, 5), "debug: profiler trace of steps 3-4 in R/profile"),
    (0, 3, True, range(3, 4), "debug: profiler trace of step 3 in R/profile"),
    (0, 2, True, range(0), "debug: no profiler trace: it is of steps 3-5, after the compile, and max_steps=2"),
    (0, 100, False, range(0), None),  # not --debug
])
def test_the_window_is_three_steps_after_the_compile_within_max_steps(start, max_steps, enabled, traced, said):
    lines = []
    trace = TraceWindow(start, max_steps, "R", enabled, lines.append)
    assert trace.steps == traced and lines == ([said] if said else [])
    assert [step for step in range(start, max_steps + 1) if step in trace] == list(traced)


def test_a_process_that_does_not_record_keeps_the_window_and_writes_no_trace(tmp_path):
    # Its steps are called as process 0's are, the window's one a call; only process 0 writes the trace.
    trace = TraceWindow(0, 100, str(tmp_path), True, lambda line: None, records=False)
    assert trace.steps == range(3, 6)
    for step in range(1, 7):
        trace.before(step)
        assert trace.after(step, jnp.ones(3)) == (step == 5)  # its last step is left out of the timing too
    trace.stopped(6, jnp.ones(3))
    assert not trace.tracing and not (tmp_path / "profile").exists()


def test_a_stop_inside_the_window_writes_the_trace_so_far_and_says_so(tmp_path):
    lines = []
    trace = TraceWindow(0, 100, str(tmp_path), True, lines.append)
    trace.failed(2)  # before the window: nothing to stop
    trace.stopped(2, jnp.ones(3))
    for step in (1, 2, 3):
        trace.before(step)
        assert not trace.after(step, jnp.ones(3) * step)
    assert trace.tracing
    trace.stopped(3, jnp.ones(3))
    trace.failed(3)  # stopped already: says nothing more
    assert not trace.tracing
    assert lines[1:] == [f"debug: the profiler trace stopped early, after step 3 of steps 3-5, in {tmp_path}/profile"]
    assert len(list((tmp_path / "profile").rglob("*.xplane.pb"))) == 1


def test_the_window_closes_at_its_last_step_and_an_error_inside_it_still_writes_the_trace(tmp_path):
    lines = []
    whole = TraceWindow(0, 100, str(tmp_path / "whole"), True, lines.append)
    closed = [step for step in range(1, 8) if (whole.before(step), whole.after(step, jnp.ones(3)))[1]]
    assert closed == [5] and not whole.tracing
    whole.stopped(7, jnp.ones(3))  # a stop signal after the window closed: its trace is whole, nothing to say
    cut = TraceWindow(0, 100, str(tmp_path / "cut"), True, lines.append)
    for step in (1, 2, 3, 4):
        cut.before(step)
    cut.failed(4)
    assert lines[2:] == [f"debug: the profiler trace stopped early, at an error in step 4 of steps 3-5, "
                         f"in {tmp_path}/cut/profile"]
    for run in ("whole", "cut"):
        assert len(list((tmp_path / run / "profile").rglob("*.xplane.pb"))) == 1, run


@pytest.mark.parametrize("where", ["failed", "after"])
def test_a_trace_that_cannot_be_written_at_an_error_leaves_that_error_to_be_raised(tmp_path, where):
    # failed() runs as the step's error propagates: raising over it would hide why the run stopped. A window that
    # cannot close is such an error, and the failed() that follows it must not try the trace again.
    lines = []
    trace = TraceWindow(0, 100, str(tmp_path), True, lines.append)
    trace.before(3)
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
    (tmp_path / "profile").write_text("")  # stop_trace fails: "... is not a directory"
    try:
        if where == "after":
            with pytest.raises(Exception, match="directory"):
                trace.after(5, jnp.ones(3))
            assert not trace.tracing  # else failed() below would stop the broken trace a second time
        trace.failed(5)
        assert not trace.tracing and lines[1:] == []  # no line that says a trace was written
    finally:  # the profiler is still started: stop it where it can write, for the tests after this one
        (tmp_path / "profile").unlink()
        jax.profiler.stop_trace()


@pytest.mark.parametrize("stop", ["after", "stopped"])
def test_the_trace_stops_once_the_step_in_it_has_finished(tmp_path, stop):
    # Steps are dispatched asynchronously: a trace stopped as the step returns would miss most of its compute.
    slow = jax.jit(lambda x_DxD: jax.lax.fori_loop(0, 40, lambda i, x_DxD: jnp.tanh(x_DxD @ x_DxD), x_DxD))
    x_DxD = jnp.ones((500, 500)) / 500
    slow(x_DxD).block_until_ready()  # compiled before the trace, as the window starts after the compile
    trace = TraceWindow(0, 3, str(tmp_path), True, lambda line: None)  # the window is step 3 alone
    trace.before(3)
    state = slow(x_DxD)
    getattr(trace, stop)(3, state)
    assert state.is_ready() and not trace.tracing
