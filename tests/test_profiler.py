"""--debug's trace window: which steps it traces, and a trace still written when the run stops inside it."""

import jax.numpy as jnp
import pytest

from midgpt.profiler import TraceWindow


@pytest.mark.parametrize("start, max_steps, enabled, traced, said", [
    (0, 100, True, range(3, 6), "debug: profiler trace of steps 3-5 in R/profile"),
    (10, 100, True, range(13, 16), "debug: profiler trace of steps 13-15 in R/profile"),  # a resume: after its compile
    (0, 4, True, range(3, 5), "debug: profiler trace of steps 3-4 in R/profile"),
    (0, 3, True, range(3, 4), "debug: profiler trace of step 3 in R/profile"),
    (0, 2, True, range(0), "debug: no profiler trace: it is of steps 3-5, after the compile, and max_steps=2"),
    (0, 100, False, range(0), None),  # not --debug, or not process 0
])
def test_the_window_is_three_steps_after_the_compile_within_max_steps(start, max_steps, enabled, traced, said):
    lines = []
    trace = TraceWindow(start, max_steps, "R", enabled, lines.append)
    assert trace.steps == traced and lines == ([said] if said else [])
    assert [step for step in range(start, max_steps + 1) if step in trace] == list(traced)


def test_a_stop_inside_the_window_writes_the_trace_so_far_and_says_so(tmp_path):
    lines = []
    trace = TraceWindow(0, 100, str(tmp_path), True, lines.append)
    trace.failed(2)  # before the window: nothing to stop
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
    cut = TraceWindow(0, 100, str(tmp_path / "cut"), True, lines.append)
    for step in (1, 2, 3, 4):
        cut.before(step)
    cut.failed(4)
    assert lines[2:] == [f"debug: the profiler trace stopped early, at an error in step 4 of steps 3-5, "
                         f"in {tmp_path}/cut/profile"]
    for run in ("whole", "cut"):
        assert len(list((tmp_path / run / "profile").rglob("*.xplane.pb"))) == 1, run
