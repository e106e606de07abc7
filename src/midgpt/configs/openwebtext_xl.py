"""The XL model (1.3B parameters) on OpenWebText (GPT-2 BPE), FSDP over every device of a pod or cluster.

Parameters and optimiser state are sharded over the whole mesh; the global batch of
1024 sequences is split over every device. Data: python data/openwebtext/prepare.py.
"""

from midgpt.config import Config, ModelConfig

config = Config(
    data_dir="data/openwebtext",
    model=ModelConfig(vocab_size=50304, block_size=1024, n_layer=24, n_head=16, n_embd=2048, dropout=0.0),
    batch_size=1024,
    g_accum_iters=1,
    learning_rate=1e-3,
    warmup_steps=2500,
    max_steps=25000,
    lr_decay_steps=25000,
    min_lr=1e-5,
    beta2=0.95,
    weight_decay=1e-4,
    eval_interval=1000,
    eval_iters=50,
    log_interval=10,
    checkpoint_interval=1000,
    compute_dtype="bfloat16",
    mesh_shape=(1, -1),
    shard_model=True,
)
