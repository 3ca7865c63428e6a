"""What one generation of the search costs: the pipeline's own `evolve` for one generation with the
paper's selection schedule (16 -> 8 -> 4 -> 2 -> 1; fitness on 1K/2K/4K/8K tokens; training-aware
selection on 10K/50K/100K/200K tokens), on a randomly initialised Llama of a real block shape with
--layers blocks, and the same generation without training (scoring only).

Token counts are multiplied by --token-scale (each step still uses at least one sequence), so a CPU
can run it; the whole-model figure is projected from the measured one by the ratio of training
FLOPs per token (6 x parameters touched per token: blocks + LM head) and 1 / token-scale, and is
marked projected.

    .venv/bin/python bench/search_generation.py                       # cuda: Llama-3.1-8B block shape
    .venv/bin/python bench/search_generation.py --device cpu --hidden 1024 --intermediate 3584 \\
        --heads 8 --kv-heads 2 --layers 2 --vocab 32000 --token-scale 0.015625
"""
import argparse
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.config import SearchParams, SelectionStage, load_params  # noqa: E402
from pipeline.model.structure import structure_of  # noqa: E402
from pipeline.pruning.database import Database, build_database  # noqa: E402
from pipeline.run.distributed import SINGLE  # noqa: E402
from pipeline.search.evolution import LevelSwapper, evolve, uniform_levels  # noqa: E402
from pipeline.search.fitness import teacher_targets  # noqa: E402

PAPER_SCHEDULE = ((8, 1024, 10240), (4, 2048, 51200), (2, 4096, 102400), (1, 8192, 204800))
# Llama-3.1-8B: 32 blocks of this shape and a 128256-token vocabulary, untied embeddings.
FULL_MODEL = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=32, vocab=128256)


def block_params(hidden, intermediate, heads, kv_heads, head_dim=128):
    return hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * intermediate


def flops_per_token(hidden, intermediate, heads, kv_heads, layers, vocab):
    """Training FLOPs per token: 6 x (the blocks' weights + the LM head)."""
    return 6 * (layers * block_params(hidden, intermediate, heads, kv_heads) + vocab * hidden)


def one_generation(swapper, start, params, fitness_set, teacher, train_set, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    evolve(swapper, start, params, fitness_set, teacher, train_set)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began


def main():
    args = argparse.ArgumentParser(description=__doc__)
    args.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    for name, value in FULL_MODEL.items():
        args.add_argument(f"--{name.replace('_', '-')}", type=int, default=value if name != "layers" else 4)
    args.add_argument("--seq-len", type=int, default=1024)
    args.add_argument("--token-scale", type=float, default=1.0)
    args.add_argument("--target", type=float, default=0.5)
    a = args.parse_args()
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                         num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                         head_dim=128, max_position_embeddings=a.seq_len)
    model = LlamaForCausalLM(config).to(dtype).eval()
    scaled = tuple(SelectionStage(survivors=s, fitness_tokens=max(a.seq_len, round(f * a.token_scale)),
                                  train_tokens=max(a.seq_len, round(t * a.token_scale)))
                   for s, f, t in PAPER_SCHEDULE)
    windows = max(s.train_tokens for s in scaled) // a.seq_len + 1
    train_set = torch.randint(0, a.vocab, (windows, a.seq_len))
    fitness_set = torch.randint(0, a.vocab, (max(s.fitness_tokens for s in scaled) // a.seq_len, a.seq_len))
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        build_database(model, structure_of(model), fitness_set[:2], 10, 0.01, Path(tmp), {}, batch_size=1,
                       group=replace(SINGLE, device=device))
        print(f"database for {a.layers} blocks built in {time.perf_counter() - began:.1f}s", flush=True)
        db = Database(tmp)
        model.to(device)
        teacher = teacher_targets(model, fitness_set, 1, "topk_kl", 256)
        start = uniform_levels(a.target, db.levels, a.layers)
        swapper = LevelSwapper(model, db)
        params = SearchParams.model_validate({**load_params(ROOT / "params.yaml").search.model_dump(), **dict(
            target=a.target, generations=1, offspring=16, schedule=scaled, tas=True, train_lr=1e-5, train_batch_size=1,
            fitness="topk_kl", batch_size=1, eval_every=0)})
        db.weights_for(start)  # read from disk once, outside the timing
        with_training = one_generation(swapper, start, params, fitness_set, teacher, train_set, device)
        scoring_only = one_generation(swapper, start, params.model_copy(update={"tas": False}), fitness_set, teacher,
                                      train_set, device)
    train_tokens = sum(n * s.train_tokens for n, s in zip((16, 8, 4, 3), scaled))
    small = flops_per_token(a.hidden, a.intermediate, a.heads, a.kv_heads, a.layers, a.vocab)
    full = flops_per_token(**FULL_MODEL)
    projected = with_training * (full / small) / a.token_scale
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}"
          f", {torch.get_num_threads()} threads), {dtype}; shape hidden {a.hidden}, MLP {a.intermediate}, "
          f"{a.heads}/{a.kv_heads} heads, {a.layers} blocks, vocab {a.vocab}; seq_len {a.seq_len}; "
          f"token scale {a.token_scale}")
    print("| generation (16 offspring, paper schedule) | seconds |")
    print("|---|---|")
    print(f"| with training-aware selection ({train_tokens:,} training tokens), measured | {with_training:.1f} |")
    print(f"| scoring only, measured | {scoring_only:.1f} |")
    print(f"| training FLOP rate achieved, measured | {small * train_tokens / with_training / 1e12:.3f} TFLOP/s |")
    print(f"| Llama-3.1-8B, full tokens, at that rate: projected by FLOPs ({full / small:.1f}x per token, "
          f"{1 / a.token_scale:.0f}x tokens) | {projected:,.0f} ({projected / 3600:.1f} h; 200 generations: "
          f"{200 * projected / 3600:,.0f} h) |")


if __name__ == "__main__":
    main()
