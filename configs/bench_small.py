"""GPT-2-style workload for CPU speed comparisons (issue: performance).

Command:  python -m llm_jax.benchmark --config configs/bench_small.py --steps 20
          python benchmarks/torch_reference.py --steps 20   (PyTorch, side by side)
Runtime:  ~1 min on a 2-core CPU.
Expected: vocab 8192, seq 256, d_model 384, 6 layers, 6 heads, MLP 1536 GELU, pre-LayerNorm,
          learned positions, tied embeddings, batch 16, AdamW: 13.9M parameters and
          89.8 MFLOP per token. Measured tokens/s are in the README's Performance table.
"""
from llm_jax.config import base_config


def get_config():
    c = base_config()
    c.model.num_layers = 6
    c.model.d_model = 384
    c.model.num_heads = 6
    c.model.mlp_dim = 1536
    c.model.activation = "gelu"
    c.model.norm = "layernorm"
    c.model.positions = "learned"
    c.model.tie_embeddings = True
    # fastest on a 2-core CPU once freed memory stays mapped (README, Performance)
    c.model.remat = "none"
    c.model.scan_layers = False
    # one causal sequence per row, as GPT-2 and benchmarks/torch_reference.py train
    c.model.document_mask = False
    c.data.seq_len = 256
    c.data.vocab_size = 8192
    c.train.batch_size = 16
    c.train.steps = 100
    return c
