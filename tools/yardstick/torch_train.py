"""PyTorch yardstick for `holdfast bench train`: the same Llama shapes, loss and AdamW step,
eager f32 on the CPU, timed the same way (warm-up steps, then timed steps), printed as one
JSON line with the same field names.

    python tools/yardstick/torch_train.py --preset small --batch-size 16 --context 128 --threads 2

The model mirrors crates/model/src/llama.rs (RMSNorm, half-split RoPE, grouped-query
attention with a causal mask, SwiGLU, tied embeddings); the step mirrors
crates/train/src/step.rs (mean cross-entropy, backward, global-norm clip 1.0, AdamW).
"""

import argparse
import json
import math
import resource
import time

import torch
import torch.nn.functional as F

# crates/model/src/config.rs, ModelConfig::preset: hidden, ffn, layers, heads, kv heads, context.
PRESETS = {
    "tiny": (64, 176, 2, 4, 2, 64),
    "char-small": (128, 352, 4, 4, 4, 128),
    "small": (384, 1024, 6, 6, 2, 256),
}
VOCAB = 256


class Llama(torch.nn.Module):
    def __init__(self, hidden, ffn, layers, heads, kv_heads, context, fused, theta=1e4, eps=1e-5):
        super().__init__()
        self.fused = fused
        self.heads, self.kv_heads, self.hd, self.eps = heads, kv_heads, hidden // heads, eps
        self.embed = torch.nn.Parameter(torch.randn(VOCAB, hidden) * 0.02)
        lin = lambda i, o: torch.nn.Parameter(torch.randn(i, o) * 0.02)
        self.layers = torch.nn.ModuleList()
        for _ in range(layers):
            p = torch.nn.ParameterDict(
                {
                    "in_norm": torch.nn.Parameter(torch.ones(hidden)),
                    "q": lin(hidden, heads * self.hd),
                    "k": lin(hidden, kv_heads * self.hd),
                    "v": lin(hidden, kv_heads * self.hd),
                    "o": lin(heads * self.hd, hidden),
                    "post_norm": torch.nn.Parameter(torch.ones(hidden)),
                    "gate": lin(hidden, ffn),
                    "up": lin(hidden, ffn),
                    "down": lin(ffn, hidden),
                }
            )
            self.layers.append(p)
        self.final_norm = torch.nn.Parameter(torch.ones(hidden))
        half = self.hd // 2
        inv_freq = 1.0 / theta ** (torch.arange(half, dtype=torch.float64) * 2 / self.hd)
        angles = (torch.arange(context, dtype=torch.float64)[:, None] * inv_freq).float()
        angles = torch.cat([angles, angles], dim=1)
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())

    def rms(self, x, w):
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * w

    def rope(self, x, t):
        half = self.hd // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * self.cos[:t] + rotated * self.sin[:t]

    def forward(self, tokens):
        b, t = tokens.shape
        x = self.embed[tokens]
        mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        rep = self.heads // self.kv_heads
        for p in self.layers:
            h = self.rms(x, p["in_norm"])
            q = (h @ p["q"]).view(b, t, self.heads, self.hd).transpose(1, 2)
            k = (h @ p["k"]).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
            v = (h @ p["v"]).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
            q, k = self.rope(q, t), self.rope(k, t)
            if self.fused:
                attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
                scores = (q @ k.transpose(2, 3)) / math.sqrt(self.hd)
                scores = scores.masked_fill(mask, float("-inf"))
                attn = scores.softmax(-1) @ v
            x = x + attn.transpose(1, 2).reshape(b, t, -1) @ p["o"]
            h = self.rms(x, p["post_norm"])
            x = x + (F.silu(h @ p["gate"]) * (h @ p["up"])) @ p["down"]
        return self.rms(x, self.final_norm) @ self.embed.T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--context", type=int)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--fused-attention",
        action="store_true",
        help="use F.scaled_dot_product_attention instead of the plain ops holdfast runs",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hidden, ffn, layers, heads, kv, context = PRESETS[args.preset]
    seq = args.context or context
    model = Llama(hidden, ffn, layers, heads, kv, seq, args.fused_attention)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    data = torch.randint(0, VOCAB, (64, seq + 1))

    def step(i):
        rows = data[(torch.arange(args.batch_size) + i * args.batch_size) % data.shape[0]]
        logits = model(rows[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), rows[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    for i in range(args.warmup):
        step(i)
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(args.steps):
        step(args.warmup + i)
    secs = time.perf_counter() - start
    cpu_secs = time.process_time() - cpu_start
    tokens_per_s = args.batch_size * seq * args.steps / secs
    print(
        json.dumps(
            {
                "yardstick": "pytorch-eager" + ("-sdpa" if args.fused_attention else ""),
                "torch": torch.__version__,
                "preset": args.preset,
                "params": params,
                "batch_size": args.batch_size,
                "seq_len": seq,
                "warmup_steps": args.warmup,
                "steps": args.steps,
                "tokens_per_s": round(tokens_per_s, 1),
                "est_flop_per_s": 6.0 * params * tokens_per_s,
                "step_ms": secs * 1000 / args.steps,
                "cpu_ms_per_step": cpu_secs * 1000 / args.steps,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "threads": torch.get_num_threads(),
            }
        )
    )



if __name__ == "__main__":
    main()
