"""A run's metrics, written by process 0: metrics.jsonl and TensorBoard event files in the run directory."""

import contextlib
import glob
import json
import os
import struct
import time

from google.protobuf.message import DecodeError
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.record_writer import masked_crc32c
from tensorboardX.summary import scalar, text

from midgpt.errors import MidgptError
from midgpt.files import write_atomically

# TensorBoard tag of each metric; metrics.jsonl keeps the plain names.
TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "param_norm": "train/param_norm",
    "train_loss": "eval/train_loss",
    "val_loss": "eval/val_loss",
    "tokens_per_sec": "perf/tokens_per_sec",
    "step_ms": "perf/step_ms",
    "mfu": "perf/mfu",
    "peak_memory_gib": "perf/peak_memory_gib",
}


def _lines(path: str) -> list[bytes]:
    """metrics.jsonl's lines, each ending in a newline, but for a last one torn by a killed write."""
    with open(path, "rb") as f:  # bytes: json.loads checks the UTF-8 of each line, as a ValueError
        lines = f.readlines()
    if lines and not lines[-1].endswith(b"\n"):
        try:  # whole but for its newline (an editor's save drops it): a record, not a tear
            json.loads(lines[-1])["step"]
            lines[-1] += b"\n"
        except (ValueError, TypeError, KeyError):
            lines.pop()
    return lines


def rewind_jsonl(path: str, step: int):
    """Keep the records up to step: a resumed run logs the later ones again."""
    if not os.path.exists(path):
        return
    lines = _lines(path)
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, TypeError, KeyError):  # someone's edit: theirs to fix, not ours to drop
            raise MidgptError(f"line {number} of {path} is not a metrics record; fix or remove it, "
                              "then resume") from None
    # Where the kept records are the file's first lines, as a run writes them, truncate: one call that a kill cannot
    # tear, and `tail -f` goes on following the same file. Else rewrite it: a record out of order, or a kept last
    # line that _lines gave the newline the file lacks.
    if kept == lines[:len(kept)] and (size := sum(map(len, kept))) <= os.path.getsize(path):
        os.truncate(path, size)
    else:
        write_atomically(path, b"".join(kept))


def last_step(path: str) -> int:
    """The latest step that metrics.jsonl records; 0 for none, or for a file that cannot be read as records."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        return max((json.loads(line)["step"] for line in _lines(path)), default=0)
    return 0


def rewind_events(rundir: str, step: int):
    """Keep the TensorBoard events up to step, but for the config of an attempt that started there."""
    # The files themselves are cut: SummaryWriter's purge_step would only hide later events,
    # and TensorBoard's default (fast) loader ignores it.
    # First: the rewrite of a file below goes through its .tmp, which the glob may list after it.
    for path in glob.glob(os.path.join(rundir, "events.out.tfevents.*.tmp")):
        # A rewrite cut short by a kill: TensorBoard would read it as one more file, repeating the curves.
        os.remove(path)
    for path in glob.glob(os.path.join(rundir, "events.out.tfevents.*")):
        with open(path, "rb") as f:
            data = f.read()
        kept, at = [], 0
        # A record: length (8 bytes), its crc (4), the event, its crc (4). A kill tears the last one alone, short
        # of its end; damage elsewhere was taken for a tear, and every event after it dropped without a word.
        damaged = lambda at: MidgptError(f"{path} is damaged at byte {at} (no TensorBoard record there); move it "
                                         f"out of {rundir}, then resume (TensorBoard reads it up to there)")
        while at + 12 <= len(data):
            header = data[at:at + 8]
            end = at + 16 + struct.unpack("<Q", header)[0]
            if struct.unpack("<I", data[at + 8:at + 12])[0] != masked_crc32c(header):
                raise damaged(at)
            if end > len(data):  # torn by a kill
                break
            try:
                event = Event.FromString(data[at + 12:end - 4])
            except DecodeError:
                raise damaged(at) from None
            is_config = any(v.tag.startswith("config") for v in event.summary.value)
            if event.step < step or event.step == step and not is_config:
                kept.append(data[at:end])
            at = end
        if (cut := b"".join(kept)) != data:  # a resume at the newest step cuts nothing: no rewrite of every event
            write_atomically(path, cut)


class MetricsLog:
    """Appends one record per log step; a run resumed at `start` continues the same curves."""

    def __init__(self, rundir: str, start: int, config_json: str):
        self.path = os.path.join(rundir, "metrics.jsonl")
        rewind_jsonl(self.path, start)
        rewind_events(rundir, start)  # so curves never jump back
        self.jsonl = open(self.path, "a")
        # Written and flushed here rather than by SummaryWriter's thread: a full disk fails the
        # log step that met it, once, instead of a thread and an exit handler each with a traceback.
        self.events = EventsWriter(os.path.join(rundir, "events"), filename_suffix=f".{os.getpid()}")
        self._add(start, text("config", f"```\n{config_json}\n```"))  # with a resume's overrides

    def _add(self, step: int, summary: Summary):
        self.events.write_event(Event(wall_time=time.time(), step=step, summary=summary))
        self.events.flush()

    def write(self, record: dict):
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        values = [scalar(TAGS[k], v).value[0] for k, v in record.items() if k in TAGS and v is not None]
        self._add(record["step"], Summary(value=values))

    def close(self):
        # Each write flushed both files, so only bytes of a write that failed, and raised, can be left.
        for f in (self.jsonl, self.events):
            with contextlib.suppress(OSError):
                f.close()
