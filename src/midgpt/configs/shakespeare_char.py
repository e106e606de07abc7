"""midGPT's baby GPT on character-level Shakespeare: 6 layers, 6 heads, width 384, for one accelerator."""

from midgpt.config import Config, ModelConfig

config = Config(
    data_dir="data/shakespeare_char",
    # remat "dots" keeps the weight matmuls' outputs: 38 MB more than "full" here, and faster on a CPU.
    model=ModelConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2, remat="dots"),
    batch_size=64,
    g_accum_iters=1,
    learning_rate=1e-3,
    warmup_steps=100,
    max_steps=5000,
    lr_decay_steps=5000,
    min_lr=1e-4,
    beta2=0.99,
    weight_decay=1e-4,
    eval_interval=250,
    eval_iters=200,
    log_interval=10,
    compute_dtype="bfloat16",
)
