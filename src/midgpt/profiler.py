"""--debug's profiler trace of a few training steps, written to the run directory's profile/."""

import contextlib
import os
from collections.abc import Callable

import jax

from midgpt.cli import named_steps


class TraceWindow:
    """The steps a --debug run traces, and the trace's start and stop around them (on the process that records)."""

    def __init__(self, start: int, max_steps: int, rundir: str, enabled: bool, say: Callable[[str], None],
                 records: bool = True):
        wanted = range(start + 3, start + 6)  # steady-state steps, after the compile: the trace shows the step itself
        # On every process of a run, recording or not, as calls() runs the window's steps one a call: when process 0
        # alone did, it came to a program the others had not compiled, and waited for them there for ever.
        self.steps = range(wanted.start, min(wanted.stop, max_steps + 1)) if enabled else range(0)
        self.directory = os.path.join(rundir, "profile")
        self.say, self.records = say, records
        self.tracing = False  # started and not yet stopped
        if self.steps:
            say(f"debug: profiler trace of {named_steps(self.steps)} in {self.directory}")
        elif enabled:
            say(f"debug: no profiler trace: it is of {named_steps(wanted)}, after the compile, "
                f"and max_steps={max_steps}")

    def __contains__(self, step: int) -> bool:
        return step in self.steps

    def before(self, step: int) -> None:
        if self.records and self.steps and step == self.steps[0]:
            jax.profiler.start_trace(self.directory)
            self.tracing = True

    def after(self, step: int, state) -> bool:
        """Whether the window closed at this step: the steps in it are slower, so not timed."""
        if not (self.steps and step == self.steps[-1]):
            return False
        if self.tracing:
            jax.block_until_ready(state)
            self.tracing = False  # first, as in _stop_early: a stop_trace that raises is not tried again
            jax.profiler.stop_trace()
        return True

    def stopped(self, step: int, state) -> None:
        """A stop signal after `step`: the trace so far is still written."""
        if self.tracing:
            jax.block_until_ready(state)  # the step in the trace whole
            self._stop_early(f"after {named_steps(range(self.steps[0], step + 1))}")

    def failed(self, step: int) -> None:
        """An error in `step`: the trace so far is still written, without raising over the error."""
        if self.tracing:
            with contextlib.suppress(Exception):
                self._stop_early(f"at an error in step {step}")

    def _stop_early(self, when: str) -> None:
        self.tracing = False
        jax.profiler.stop_trace()  # which writes what was traced
        self.say(f"debug: the profiler trace stopped early, {when} of {named_steps(self.steps)}, in {self.directory}")
