"""A 6-layer GPT for your own text, tokenized with GPT-2 BPE into data/bpe_corpus.

python data/openwebtext/prepare.py --input my_texts/*.txt --out_dir data/bpe_corpus
python launch.py --config=bpe_corpus
"""

from midgpt.config import Config, ModelConfig

config = Config(
    data_dir="data/bpe_corpus",
    model=ModelConfig(vocab_size=50304, block_size=512, n_layer=6, n_head=6, n_embd=384, dropout=0.1),
    batch_size=32,
    g_accum_iters=1,
    learning_rate=1e-3,
    warmup_steps=200,
    max_steps=5000,
    lr_decay_steps=5000,
    min_lr=1e-4,
    beta2=0.95,
    weight_decay=1e-4,
    eval_interval=250,
    eval_iters=50,
)
