"""A run's metrics, written by process 0: metrics.jsonl and TensorBoard event files in the run directory."""

import json
import os

from tensorboardX import SummaryWriter

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


def rewind_jsonl(path: str, step: int):
    """Keep the records up to step: a resumed run logs the later ones again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.endswith("\n")]  # a killed write leaves a torn last line
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


class MetricsLog:
    """Appends one record per log step; a run resumed at `start` continues the same curves."""

    def __init__(self, rundir: str, start: int, config_json: str):
        self.path = os.path.join(rundir, "metrics.jsonl")
        rewind_jsonl(self.path, start)
        self.jsonl = open(self.path, "a")
        # purge_step hides what an earlier attempt logged after `start` (TensorBoard
        # drops those events when it reads this file), so curves never jump back.
        self.writer = SummaryWriter(rundir, purge_step=start + 1, filename_suffix=f".{os.getpid()}")
        if start == 0:
            self.writer.add_text("config", f"```\n{config_json}\n```", 0)

    def write(self, record: dict):
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for name, value in record.items():
            if name in TAGS and value is not None:
                self.writer.add_scalar(TAGS[name], value, record["step"])
        self.writer.flush()

    def close(self):
        self.jsonl.close()
        self.writer.close()
