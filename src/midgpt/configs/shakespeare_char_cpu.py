"""The laptop version of shakespeare_char: 4 layers of width 128, trained on a 2-core CPU in one to three minutes."""

import dataclasses

from midgpt import cpu
from midgpt.configs import shakespeare_char

# How the layers run depends on the processor (benchmarks/RESULTS.md). On AMD EPYCs (AVX-512 BF16, or AVX2 in
# float32) keeping every layer's activations, the four layers unrolled (a scan would stack them), took 0.78-0.85x
# the step time of recomputing them two layers a scan iteration (the AVX-512 one's full run: 57.6-64.5 s against
# 68.9-78.6 s), and 0.81x on an Intel Xeon without AMX (in float32). On an Intel Xeon whose AMX multiplies bf16
# at four times those EPYCs' rate, it took 1.35x.
REMAT, SCAN_UNROLL = ("full", 2) if "amx_bf16" in cpu.flags(cpu.info()) else ("none", 4)

config = dataclasses.replace(
    shakespeare_char.config,
    model=dataclasses.replace(shakespeare_char.config.model, n_layer=4, n_head=4, n_embd=128, block_size=64,
                              dropout=0.0, remat=REMAT, scan_unroll=SCAN_UNROLL),
    batch_size=12,
    # Ten steps a call, one call between log steps: in launch.py's loop on the Intel Xeon, 0.90-0.95x the
    # step time of one step a call (benchmarks/RESULTS.md).
    steps_per_call=10,
    max_steps=2000,
    lr_decay_steps=2000,
    eval_iters=50,
)
