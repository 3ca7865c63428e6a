"""How the layer database's cost grows with model size, and what it comes to for real models.

For each size, a randomly initialised one-block Llama (transformers' LlamaModel) with Llama-3.1
proportions: hidden h, h/128 query heads of 128, a quarter as many key/value heads, MLP width 3.5 h
(h = 4096 is exactly a Llama-3.1-8B block). Per block it times, on --device:

1. Hessian collection: the forward of --tokens calibration tokens (random ids, --seq-len per sequence)
   through the block, with hooks accumulating X^T X in fp32 for the inputs of o_proj and down_proj, as
   the database stage does. Reported as tokens/s and projected linearly to --calib-tokens (the paper's
   budget: 8M tokens), since the cost is linear in tokens.
2. Structured OBS on those Hessians, as the database stage runs it (`prepare_hessian` with damp 0.01,
   `greedy_obs` to the K = 10 levels, down to the empty module), in --obs-dtype (the pipeline default is
   float64): attention with units = query heads (g = 128), MLP with units = neurons (g = 1).

The same is measured for the real blocks named by --shapes (default: the Qwen2.5-14B block). Then it
fits t = c * d^p by least squares on log-log over the sweep (d = hidden for attention, MLP width for
the MLP) to compare p with the O(d^3) bound of OBS, and gives whole-model database times for
Llama-3.1-8B (32 blocks) and Qwen2.5-14B (48 blocks): blocks x the measured per-block time where that
block was measured, else scaled from the 8B-shaped block (or the largest measured) by the fitted
exponents. Every figure is marked measured or projected.

    .venv/bin/python bench/scale.py                    # full sweep (h = 512 .. 4096), cuda if present
    .venv/bin/python bench/scale.py --quick            # ~1 minute: small sizes, few tokens, no real blocks
    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python bench/scale.py --device cpu --threads 1 --shapes
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.pruning.obs import greedy_obs, prepare_hessian, removal_counts  # noqa: E402

HEAD_DIM = 128
LEVELS = 10
DAMP = 0.01


@dataclass(frozen=True)
class BlockShape:
    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int

    @staticmethod
    def llama_proportions(hidden: int) -> BlockShape:
        heads = hidden // HEAD_DIM
        return BlockShape(f"h{hidden}", hidden, hidden * 7 // 2, heads, max(1, heads // 4))

    def flops_per_token(self) -> float:
        """Multiply-adds x 2 of the block's projections plus the two Hessian accumulations (X^T X costs
        2 d^2 per token): what the collection pass does per token, attention scores aside."""
        q_dim, kv_dim = self.heads * HEAD_DIM, self.kv_heads * HEAD_DIM
        projections = self.hidden * (2 * q_dim + 2 * kv_dim) + 3 * self.hidden * self.intermediate
        return 2.0 * projections + 2.0 * (q_dim ** 2 + self.intermediate ** 2)


    def same_block(self, other: BlockShape) -> bool:
        return (self.hidden, self.intermediate, self.heads, self.kv_heads) == \
            (other.hidden, other.intermediate, other.heads, other.kv_heads)


LLAMA_8B = BlockShape("Llama-3.1-8B", 4096, 14336, 32, 8)
QWEN_14B = BlockShape("Qwen2.5-14B", 5120, 13824, 40, 8)
SHAPES = {"llama-3.1-8b": LLAMA_8B, "qwen2.5-14b": QWEN_14B}
MODELS = {LLAMA_8B: 32, QWEN_14B: 48}  # blocks


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def build_block(shape: BlockShape, device: torch.device, dtype: torch.dtype, seq_len: int) -> LlamaModel:
    config = LlamaConfig(vocab_size=256, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=1, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         head_dim=HEAD_DIM, max_position_embeddings=seq_len)
    torch.manual_seed(0)
    return LlamaModel(config).to(device=device, dtype=dtype).eval()


@torch.no_grad()
def collect(model: LlamaModel, tokens: int, seq_len: int, batch_size: int) -> tuple[dict, int]:
    """Forward `tokens` random tokens through the block, accumulating X^T X (fp32) of the inputs of o_proj
    and down_proj; returns the Hessians (/ N) and the number of tokens actually run."""
    layer = model.layers[0]
    hessians = {}

    def accumulate(key):
        def hook(_module, inputs, _output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            if key not in hessians:
                hessians[key] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            hessians[key].addmm_(x.T, x)
        return hook

    hooks = [layer.self_attn.o_proj.register_forward_hook(accumulate("attn")),
             layer.mlp.down_proj.register_forward_hook(accumulate("mlp"))]
    sequences = max(1, tokens // seq_len)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (sequences, seq_len), generator=gen)
    device = next(model.parameters()).device
    try:
        for batch in torch.split(ids, batch_size):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    n = sequences * seq_len
    return {k: h / n for k, h in hessians.items()}, n


def obs_seconds(weight: torch.Tensor, hessian: torch.Tensor, unit: int, obs_dtype: torch.dtype,
                device: torch.device) -> float:
    """prepare_hessian + greedy_obs to every level, as the database stage runs it for one module."""
    def run():
        h = prepare_hessian(hessian.to(obs_dtype), DAMP)
        return greedy_obs(weight, h, unit, removal_counts(weight.shape[1] // unit, LEVELS))
    _, seconds = timed(run, device)
    return seconds


def measure(shape: BlockShape, a, device: torch.device) -> dict:
    model = build_block(shape, device, getattr(torch, a.dtype), a.seq_len)
    collect(model, a.seq_len, a.seq_len, 1)  # warm-up: first-call allocations and kernel selection
    (hessians, n), collect_s = timed(partial(collect, model, a.tokens, a.seq_len, a.batch_size), device)
    layer = model.layers[0]
    o_proj, down_proj = layer.self_attn.o_proj.weight.detach(), layer.mlp.down_proj.weight.detach()
    obs_dtype = getattr(torch, a.obs_dtype)
    attn_s = obs_seconds(o_proj, hessians["attn"], HEAD_DIM, obs_dtype, device)
    mlp_s = obs_seconds(down_proj, hessians["mlp"], 1, obs_dtype, device)
    del model, hessians
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(shape=shape, tokens=n, tokens_per_s=n / collect_s, attn_s=attn_s, mlp_s=mlp_s)


def fit_exponent(sizes: list[float], seconds: list[float]) -> float:
    """Slope of log(seconds) against log(size), least squares."""
    xs, ys = [math.log(s) for s in sizes], [math.log(t) for t in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def device_name(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {threads} thread{'s' if threads > 1 else ''})"


def main():
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                      help="the block's weights and activations for the collection forward "
                           "(default: bfloat16 on cuda, float32 on cpu)")
    args.add_argument("--obs-dtype", default="float64", choices=["float64", "float32"],
                      help="OBS arithmetic (the pipeline's database.hessian_dtype; default float64)")
    args.add_argument("--sizes", type=int, nargs="*", default=[512, 1024, 2048, 4096],
                      help="hidden sizes; MLP width 3.5x, heads of 128 (4096 = the Llama-3.1-8B block)")
    args.add_argument("--shapes", nargs="*", default=["qwen2.5-14b"], choices=sorted(SHAPES),
                      help="real blocks measured besides the sweep (not used for the fit)")
    args.add_argument("--tokens", type=int, help="calibration tokens timed per size (default: 65536 on cuda, "
                      "4096 on cpu)")
    args.add_argument("--seq-len", type=int, default=2048)
    args.add_argument("--batch-size", type=int, default=1)
    args.add_argument("--calib-tokens", type=float, default=8e6, help="budget projected to (paper: 8-16M)")
    args.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args.add_argument("--quick", action="store_true", help="sizes 256 512 1024, 1024 tokens of 512: ~1 minute")
    a = args.parse_args()
    device = torch.device(a.device)
    a.dtype = a.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    a.tokens = a.tokens or (65536 if device.type == "cuda" else 4096)
    if a.quick:
        a.sizes, a.shapes, a.tokens, a.seq_len = [256, 512, 1024], [], 1024, 512
    if a.threads:
        torch.set_num_threads(a.threads)
    where = device_name(device, torch.get_num_threads())
    print(f"device: {where}; torch {torch.__version__}; block dtype {a.dtype}, OBS in {a.obs_dtype}; "
          f"{a.tokens} tokens of {a.seq_len} per size; K = {LEVELS} levels\n", flush=True)

    sweep, named = [], []
    print("| block | hidden | MLP width | heads (q/kv) | collection tokens/s | collection for "
          f"{a.calib_tokens / 1e6:g}M tokens | OBS attention | OBS MLP | OBS total |")
    print("|---|---|---|---|---|---|---|---|---|")
    plan = [(BlockShape.llama_proportions(h), sweep) for h in sorted(a.sizes)] + [(SHAPES[n], named) for n in a.shapes]
    for shape, results in plan:
        r = measure(shape, a, device)
        results.append(r)
        s = r["shape"]
        print(f"| {s.name} | {s.hidden} | {s.intermediate} | {s.heads}/{s.kv_heads} | {r['tokens_per_s']:,.0f} | "
              f"{duration(a.calib_tokens / r['tokens_per_s'])} (projected) | {duration(r['attn_s'])} | "
              f"{duration(r['mlp_s'])} | {duration(r['attn_s'] + r['mlp_s'])} |", flush=True)

    print()
    rows = sweep
    hidden = [r["shape"].hidden for r in rows]
    widths = [r["shape"].intermediate for r in rows]
    exponents = {}
    if len(rows) >= 2:
        exponents = {"attn": fit_exponent(hidden, [r["attn_s"] for r in rows]),
                     "mlp": fit_exponent(widths, [r["mlp_s"] for r in rows]),
                     "collect": fit_exponent(hidden, [1 / r["tokens_per_s"] for r in rows])}
        print(f"fitted exponents over hidden {hidden[0]}..{hidden[-1]} (t ~ d^p): OBS attention vs hidden "
              f"p = {exponents['attn']:.2f}, OBS MLP vs MLP width p = {exponents['mlp']:.2f} (bound: 3); "
              f"collection time per token vs hidden p = {exponents['collect']:.2f} (flops per token: 2)")
    if len(rows) >= 3:
        tail = rows[-3:]
        print(f"over the three largest sizes only: attention p = "
              f"{fit_exponent([r['shape'].hidden for r in tail], [r['attn_s'] for r in tail]):.2f}, MLP p = "
              f"{fit_exponent([r['shape'].intermediate for r in tail], [r['mlp_s'] for r in tail]):.2f}")

    measured = sweep + named
    base = next((r for r in measured if r["shape"].same_block(LLAMA_8B)), rows[-1] if exponents else None)
    if base is None:
        return
    b = base["shape"]
    print(f"\nwhole-model database on {where}: per-block figures measured where the block was, else scaled "
          f"from the {b.name} block by the fitted exponents (OBS) or by flops per token (collection); "
          f"collection projected linearly to {a.calib_tokens / 1e6:g}M tokens; whole-model totals = blocks x "
          "per block:\n")
    print(f"| model | blocks | per block: OBS | per block: collection, {a.calib_tokens / 1e6:g}M tokens | "
          "whole model: OBS | whole model: collection | whole model: total |")
    print("|---|---|---|---|---|---|---|")
    for shape, blocks in MODELS.items():
        own = next((r for r in measured if r["shape"].same_block(shape)), None)
        exact = own is not None
        if exact:
            obs, collection = own["attn_s"] + own["mlp_s"], a.calib_tokens / own["tokens_per_s"]
        else:  # the MLP's W-part grows with hidden too, which this scaling by MLP width alone leaves out
            obs = (base["attn_s"] * (shape.hidden / b.hidden) ** exponents.get("attn", 3)
                   + base["mlp_s"] * (shape.intermediate / b.intermediate) ** exponents.get("mlp", 3))
            collection = a.calib_tokens * shape.flops_per_token() / b.flops_per_token() / base["tokens_per_s"]
        print(f"| {shape.name} | {blocks} | {duration(obs)} ({'measured' if exact else 'projected'}) | "
              f"{duration(collection)} (projected) | {duration(blocks * obs)} | {duration(blocks * collection)} | "
              f"{duration(blocks * (obs + collection))} |")


if __name__ == "__main__":
    main()
