"""Inference speed of a dense model against its pruned version, on CPU and on a GPU when present.

Either a pipeline model folder (compared with the dense model it came from):

    .venv/bin/python bench/model_speed.py --pruned models/pruned --dense base/model

or a randomly initialised model of a real architecture and the pruned shape of a given target
(uniform per-layer widths; speed depends on the shape, not on which heads are kept):

    .venv/bin/python bench/model_speed.py --shape llama-3.1-8b --layers 4 --target 0.5 --dtype bfloat16

Llama-3.1-8B at target 0.5 is the paper's 4.6B shape (about 49% of attention+MLP removed).
Prints prefill tokens/s, decode ms/token (KV cache) and peak memory, medians after warm-up, and the
pruned/dense ratios measured in the same run.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.evaluate import measure_speed  # noqa: E402
from pipeline.model.pruned_llama import PrunedLlamaConfig, PrunedLlamaForCausalLM, layer_record  # noqa: E402
from pipeline.model.structure import count_params  # noqa: E402

SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "qwen2.5-14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064),
}


def random_pair(shape: str, layers: int | None, target: float, dtype, kv_group: bool):
    kw = dict(SHAPES[shape], max_position_embeddings=4096)
    if layers:
        kw["num_hidden_layers"] = layers
    heads, kv, inter = kw["num_attention_heads"], kw["num_key_value_heads"], kw["intermediate_size"]
    group = heads // kv
    keep_kv = max(1, round(kv * (1 - target)))
    q_heads = list(range(keep_kv * group)) if kv_group else list(range(round(heads * (1 - target))))
    kv_heads = sorted({q // group for q in q_heads})
    n = kw["num_hidden_layers"]
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**kw)).to(dtype).eval()
    record = layer_record(q_heads, kv_heads, round(inter * (1 - target)))
    pruned = PrunedLlamaForCausalLM(PrunedLlamaConfig(**kw, layers=[record] * n))
    return dense, pruned.to(dtype).eval()


def main():
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--pruned", help="a pruned model folder")
    args.add_argument("--dense", help="the dense model folder it came from")
    args.add_argument("--shape", choices=sorted(SHAPES))
    args.add_argument("--layers", type=int, help="use fewer layers than the real model (memory)")
    args.add_argument("--target", type=float, default=0.5)
    args.add_argument("--kv-group", action="store_true", help="prune whole key/value groups (smaller KV cache)")
    args.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args.add_argument("--batch-size", type=int, default=1)
    args.add_argument("--prompt-len", type=int, default=128)
    args.add_argument("--decode-tokens", type=int, default=32)
    args.add_argument("--repeats", type=int, default=5)
    args.add_argument("--json", help="also write the results here")
    a = args.parse_args()
    dtype = getattr(torch, a.dtype)
    if a.shape:
        dense, pruned = random_pair(a.shape, a.layers, a.target, dtype, a.kv_group)
    elif a.pruned and a.dense:
        dense = AutoModelForCausalLM.from_pretrained(a.dense, dtype=dtype).eval()
        pruned = AutoModelForCausalLM.from_pretrained(a.pruned, dtype=dtype, trust_remote_code=True).eval()
    else:
        args.error("give --shape, or --pruned and --dense")
    results = {}
    for name, model in (("dense", dense), ("pruned", pruned)):
        model.to(a.device)
        results[name] = measure_speed(model, batch_size=a.batch_size, prompt_len=a.prompt_len,
                                      decode_tokens=a.decode_tokens, repeats=a.repeats)
        results[name]["parameters"] = count_params(model)
        model.to("cpu")
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
        r = results[name]
        print(f"{name:7s} {r['parameters']:>14,} params  prefill {r['prefill_tokens_per_s']:>10,.0f} tok/s  "
              f"decode {r['decode_ms_per_token']:8.2f} ms/tok  peak {r['peak_memory_mb']:>9,.0f} MiB", flush=True)
    d, p = results["dense"], results["pruned"]
    results["ratio"] = {"prefill": p["prefill_tokens_per_s"] / d["prefill_tokens_per_s"],
                        "decode": d["decode_ms_per_token"] / p["decode_ms_per_token"],
                        "memory": p["peak_memory_mb"] / d["peak_memory_mb"]}
    print(f"device: {d['device']}; dtype {a.dtype}; batch {a.batch_size} x prompt {a.prompt_len}, "
          f"{a.decode_tokens} decode tokens, median of {a.repeats}")
    print(f"pruned vs dense: prefill {results['ratio']['prefill']:.2f}x faster, decode "
          f"{results['ratio']['decode']:.2f}x faster, memory {results['ratio']['memory']:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
