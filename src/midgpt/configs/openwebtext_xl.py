"""The XL model (1.3B parameters) on OpenWebText (GPT-2 BPE), FSDP over every device of a pod or cluster.

Parameters and optimiser state are sharded over the whole mesh (the defaults
mesh_shape=1,-1 and shard_model=true); the global batch of 1024 sequences is split
over every device. Everything else is as in openwebtext.
"""

import dataclasses

from midgpt.configs import openwebtext

config = dataclasses.replace(
    openwebtext.config,
    model=dataclasses.replace(openwebtext.config.model, n_layer=24, n_head=16, n_embd=2048),
    batch_size=1024,
    g_accum_iters=1,
    warmup_steps=2500,
    max_steps=25000,
    lr_decay_steps=25000,
)
