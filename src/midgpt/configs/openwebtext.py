"""midGPT's 124M GPT on OpenWebText (GPT-2 BPE): the GPT-2 small shape, bf16 compute on GPUs and TPUs (`auto`).

A global batch of 128 x 16 = 2048 sequences of 1024 tokens (2M tokens) per step,
accumulated over 16 micro-batches. Data: python data/openwebtext/prepare.py.
"""

from midgpt.config import Config, ModelConfig

config = Config(
    data_dir="data/openwebtext",
    # 50304 = 50257 GPT-2 tokens rounded up to a multiple of 64, for faster matmuls.
    model=ModelConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, dropout=0.0),
    batch_size=128,
    g_accum_iters=16,
    learning_rate=1e-3,
    warmup_steps=5000,
    max_steps=60000,
    lr_decay_steps=60000,
    min_lr=1e-5,
    beta2=0.95,
    weight_decay=1e-4,
    eval_interval=1000,
    eval_iters=50,
    log_interval=10,
    checkpoint_interval=1000,
)
