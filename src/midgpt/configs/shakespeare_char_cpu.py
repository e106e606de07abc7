"""The laptop version of shakespeare_char: 4 layers of width 128, trained on a 2-core CPU in one to three minutes."""

import dataclasses

from midgpt.configs import shakespeare_char

config = dataclasses.replace(
    shakespeare_char.config,
    model=dataclasses.replace(shakespeare_char.config.model, n_layer=4, n_head=4, n_embd=128, block_size=64,
                              dropout=0.0,
                              # Two layers per scan iteration, each recomputed in the backward pass: on
                              # the Intel Xeon, 0.92x the step time of one layer with remat "dots"
                              # (benchmarks/RESULTS.md), which had measured 19 ms on the AMD EPYC against
                              # 37 ms without remat and 27 ms unrolled (the full config's choices). Both at
                              # once (remat "none", the four layers unrolled) now take 0.78-0.81x this step
                              # on the AVX-512 EPYC; the Intel had taken 1.35x, before ten steps a call.
                              remat="full", scan_unroll=2),
    batch_size=12,
    # Ten steps a call, one call between log steps: in launch.py's loop on the Intel Xeon, 0.90-0.94x the
    # step time of one step a call (benchmarks/RESULTS.md).
    steps_per_call=10,
    max_steps=2000,
    lr_decay_steps=2000,
    eval_iters=50,
)
