"""The tiny model the single-process tests train: 2 layers of width 32, chunks of 16 tokens,
σ-MoE of 4 experts (top-2). Each test file adds its vocabulary and training settings."""

TINY_MODEL = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.seq_len=16",
    "model.attention.d_head=16",
    "model.moe.n_experts=4",
    "model.moe.expert_size=16",
    "model.moe.k=2",
]
