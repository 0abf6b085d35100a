"""PyTorch reference for configs/bench_small.py, for side-by-side CPU speed only.

Not a dependency of llm_jax: `pip install torch` to run it. The same GPT-2-style model
(vocab 8192, seq 256, d_model 384, 6 layers, 6 heads, MLP 1536 GELU, pre-LayerNorm,
learned positions, tied embeddings), batch 16, AdamW, on random tokens.

    python benchmarks/torch_reference.py --steps 20 [--bf16] [--compile]
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

V, T, D, L, H, M, B = 8192, 256, 384, 6, 6, 1536, 16


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D, bias=False), nn.Linear(D, D, bias=False)
        self.fc, self.out = nn.Linear(D, M, bias=False), nn.Linear(M, D, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).view(x.shape[0], T, 3, H, D // H).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(x.shape))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(T, D)
        self.blocks = nn.ModuleList(Block() for _ in range(L))
        self.ln = nn.LayerNorm(D)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(T))
        for b in self.blocks:
            x = b(x)
        return self.ln(x) @ self.wte.weight.T


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile")
    args = p.parse_args()
    torch.manual_seed(0)
    model = GPT()
    params = sum(x.numel() for x in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    step_model = torch.compile(model) if args.compile else model
    tokens = torch.randint(0, V, (B, T + 1))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = step_model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, V), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up (and compilation)
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    med = statistics.median(times)
    print(f"torch {torch.__version__} {'bf16 autocast' if args.bf16 else 'f32'}"
          f"{' compiled' if args.compile else ''}: {params / 1e6:.1f}M params, "
          f"{B * T / med:,.0f} tokens/s median ({B * T / max(times):,.0f}-"
          f"{B * T / min(times):,.0f}), step {med:.3f} s")


if __name__ == "__main__":
    main()
