"""Measurements of a model: perplexity on held-out tokens, inference speed on the current device
(prefill throughput, decode latency with the KV cache, peak memory; medians of repeats after warm-up),
and third-party tasks with lm-evaluation-harness (`lm_eval`), including tasks defined by local YAML
files whose data are local files (offline)."""
from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.model.materialize import dense_unit_weights, materialize
from pipeline.run.distributed import device_of
from pipeline.train import next_token_loss


@torch.no_grad()
def perplexity(model, sequences: torch.Tensor, batch_size: int) -> float:
    """exp(mean next-token cross-entropy) over every predicted position of `sequences`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = device_of(model)
    for batch in torch.split(sequences, batch_size):
        batch = batch.to(device)
        total += float(next_token_loss(model(input_ids=batch, use_cache=False).logits.float(), batch, reduction="sum"))
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def measure_speed(model, *, batch_size: int = 1, prompt_len: int = 128, decode_tokens: int = 32,
                  repeats: int = 5, warmup: int = 2, vocab_size: int | None = None) -> dict:
    """prefill tokens/s over (batch_size x prompt_len), decode ms per generated token (one token per
    step, KV cache on), peak memory (CUDA: allocator peak; CPU: weights + KV cache at the end)."""
    model.eval()
    device = device_of(model)
    vocab = vocab_size or model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (batch_size, prompt_len), generator=gen).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill, decode, kv_bytes = [], [], 0
    for i in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        _sync(device)
        prefill_s = time.perf_counter() - start
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=token, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        _sync(device)
        decode_s = time.perf_counter() - start
        if i >= warmup:
            prefill.append(prefill_s)
            decode.append(decode_s)
            kv_bytes = _cache_bytes(cache)
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else weights + kv_bytes
    return {
        "prefill_tokens_per_s": batch_size * prompt_len / statistics.median(prefill),
        "decode_ms_per_token": 1000 * statistics.median(decode) / decode_tokens,
        "peak_memory_mb": peak / 2**20,
        "kv_cache_mb": kv_bytes / 2**20,
        "device": device_name(device),
        "batch_size": batch_size, "prompt_len": prompt_len, "decode_tokens": decode_tokens, "repeats": repeats,
    }


def llama_cpp_model(path: str | Path, **kwargs):
    """A llama-cpp-python `Llama` for a GGUF file (`kwargs` as `Llama` takes them), with weight repacking
    into extra buffer types off (llama-cli / llama-server: `--no-repack`): on CPUs with AMX_INT8 llama.cpp
    repacks quantized weights for its AMX kernel, whose matmul segfaults on some machines (llama.cpp#20824;
    here with every q8_0 file, the original SmolLM2 Q4_1 included), and `Llama` has no parameter for it,
    so its default model params are swapped for the duration of the load."""
    import llama_cpp
    import llama_cpp.llama_cpp as raw

    defaults = raw.llama_model_default_params

    def without_repacking():
        params = defaults()
        params.use_extra_bufts = False
        return params

    raw.llama_model_default_params = without_repacking
    try:
        return llama_cpp.Llama(model_path=str(path), verbose=kwargs.pop("verbose", False), **kwargs)
    finally:
        raw.llama_model_default_params = defaults


def spread(samples: list[float]) -> float:
    """(max - min) / median: how far apart repeated measurements of one figure are."""
    return (max(samples) - min(samples)) / statistics.median(samples)


def ranges_apart(a: list[float], b: list[float]) -> bool:
    """Every run of one beat every run of the other; when the two ranges overlap, a ratio of their medians
    says nothing the machine's noise could not have made."""
    return max(a) < min(b) or max(b) < min(a)


def llama_cpp_speed(paths: dict[str, str | Path], *, prompt_len: int = 128, decode_tokens: int = 32,
                    repeats: int = 5, warmup: int = 2, threads: int | None = None) -> dict:
    """Prefill tokens/s and decode ms/token of GGUF files in llama.cpp (flash attention on, f16 KV cache,
    the same threads for all), measured interleaved: round after round, each model once (A B C A B C ...),
    so a change of the machine's load falls on all alike. Medians of `repeats` rounds after `warmup`,
    with each figure's spread; `*_times` keep the raw seconds for `ranges_apart`."""
    threads = threads or torch.get_num_threads()
    models = {name: llama_cpp_model(path, n_ctx=prompt_len + decode_tokens, n_batch=prompt_len, n_ubatch=prompt_len,
                                    n_threads=threads, n_threads_batch=threads, flash_attn=True)
              for name, path in paths.items()}
    # The same random ids for every model (speed does not depend on which tokens), valid in every vocabulary.
    vocab = min(llm.n_vocab() for llm in models.values())
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
    generated = torch.randint(0, vocab, (decode_tokens,), generator=gen).tolist()
    times = {name: {"prefill": [], "decode": []} for name in models}
    try:
        for i in range(warmup + repeats):
            for name, llm in models.items():
                llm.reset()
                start = time.perf_counter()
                llm.eval(prompt)
                prefill_s = time.perf_counter() - start
                start = time.perf_counter()
                for token in generated:
                    llm.eval([token])
                decode_s = time.perf_counter() - start
                if i >= warmup:
                    times[name]["prefill"].append(prefill_s)
                    times[name]["decode"].append(decode_s / decode_tokens)
    finally:
        for llm in models.values():
            llm.close()
    return {name: {"prefill_tokens_per_s": prompt_len / statistics.median(t["prefill"]),
                   "decode_ms_per_token": 1000 * statistics.median(t["decode"]),
                   "prefill_spread": spread(t["prefill"]), "decode_spread": spread(t["decode"]),
                   "prefill_times": t["prefill"], "decode_times": t["decode"], "threads": threads,
                   "prompt_len": prompt_len, "decode_tokens": decode_tokens, "repeats": repeats}
            for name, t in times.items()}


def run_lm_eval(model: str | Path, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                batch_size: int = 8, device: str = "cpu", dtype: str = "float32",
                fewshot: dict[str, int] | None = None) -> dict[str, dict[str, float]]:
    """{task: {metric: value, metric_stderr: value, "truncated": n}} for one model folder or hub id, loaded the
    ordinary Hugging Face way (trust_remote_code, so exported pruned folders work), each task with its own
    number of few-shot examples (`fewshot[task]`; a task left out uses its own default).

    Items longer than the model's context are truncated from the left (the harness drops the oldest
    context tokens; a continuation longer than the whole context keeps its last tokens) and counted in
    "truncated", instead of stopping the harness."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise FileNotFoundError(f"evaluate.lm_eval_tasks: unknown task(s) {', '.join(missing)}"
                                + (f" (not in lm_eval nor in '{include_path}')" if include_path else
                                   " (set evaluate.lm_eval_include_path for local task YAMLs)"))
    lm = _context_limited_lm(pretrained=str(model), trust_remote_code=True, dtype=dtype, device=device,
                             batch_size=batch_size)
    results = {}
    for task in tasks:  # one run per task: the harness takes one few-shot count per run
        lm.truncated = 0
        out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit,
                                      num_fewshot=(fewshot or {}).get(task))["results"]
        for name, values in out.items():
            results[name] = {metric.replace(",none", "").replace(",", "_"): value for metric, value in values.items()
                             if isinstance(value, (int, float)) and not metric.startswith("sample_len")}
        results[task]["truncated"] = lm.truncated
    return results


def _context_limited_lm(**model_args):
    """The harness's Hugging Face model, counting the requests that exceed the context and cutting a
    continuation longer than the whole context to its last tokens (the harness asserts on those)."""
    from lm_eval.models.huggingface import HFLM

    class ContextLimitedLM(HFLM):
        truncated = 0

        def _loglikelihood_tokens(self, requests, *args, **kwargs):
            fitted = []
            for key, context, continuation in requests:
                if len(context) + len(continuation) > self.max_length + 1:
                    self.truncated += 1
                if len(continuation) > self.max_length:
                    context, continuation = context[-1:], continuation[-self.max_length:]
                fitted.append((key, context, continuation))
            return super()._loglikelihood_tokens(fitted, *args, **kwargs)

    return ContextLimitedLM(**model_args)


def gguf_quality(reference: str | Path, paths: dict[str, str | Path], windows: list[list[int]],
                 threads: int | None = None) -> dict:
    """In llama.cpp, on token windows no decision saw: each file's KL(P_reference || P_file) per token, top-1
    agreement with the reference and perplexity, plus the reference's own perplexity (`reference` key). Full
    vocabulary; the reference's log-probabilities are computed once and kept as float16."""
    import numpy as np

    threads = threads or torch.get_num_threads()
    n_ctx = max(len(w) for w in windows)

    def logprobs(llm, window):
        llm.reset()
        llm.eval(window)
        logits = torch.from_numpy(np.array(llm.scores[:len(window)], dtype=np.float32))
        return torch.log_softmax(logits, dim=-1)

    def load(path):
        return llama_cpp_model(path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                               n_threads_batch=threads, logits_all=True)

    def nll(lp, window):
        return -lp[:-1].gather(-1, torch.tensor(window[1:]).unsqueeze(-1)).sum().item()

    llm = load(reference)
    dense, dense_nll, tokens = [], 0.0, 0
    try:
        for window in windows:
            lp = logprobs(llm, window)
            dense.append(lp.half())
            dense_nll += nll(lp, window)
            tokens += len(window) - 1
    finally:
        llm.close()
    results = {"reference": {"ppl": math.exp(dense_nll / tokens)}}
    for name, path in paths.items():
        llm = load(path)
        kl = agree = positions = 0.0
        total_nll = 0.0
        try:
            for window, ref in zip(windows, dense):
                lp = logprobs(llm, window)
                ref = ref.float()
                kl += (ref.exp() * (ref - lp)).sum().item()
                agree += (ref.argmax(-1) == lp.argmax(-1)).sum().item()
                positions += len(window)
                total_nll += nll(lp, window)
        finally:
            llm.close()
        results[name] = {"kl": kl / positions, "top1_agreement": agree / positions,
                         "ppl": math.exp(total_nll / tokens)}
    return results


def recovery_budgets(steps: int, points: int) -> list[int]:
    """Training budgets (in steps) of the recovery curves: 0 (one-shot) and m * sqrt(5)^k for k = 0 .. points-1,
    with m = round(steps / sqrt(5)^(points-1)) (at least 1) and odd k rounded up, so that the budgets of even k
    are exactly 5x apart and the curve answers "does method A at T match method B at 5T" at its own points.
    The largest budget is close to `steps`."""
    m = max(1, round(steps / 5 ** ((points - 1) / 2)))
    return sorted({0} | {m * 5 ** (k // 2) if k % 2 == 0 else math.ceil(m * 5 ** (k / 2)) for k in range(points)})


def first_budget_reaching(curve: dict[int, float], target: float) -> int | None:
    """The smallest budget of `curve` ({tokens: perplexity}) whose perplexity is at most `target`; None if none."""
    return next((tokens for tokens in sorted(curve) if curve[tokens] <= target), None)


def units_perplexity(dense, structure, tokens, batch_size: int) -> Callable[[dict], float]:
    """kept units -> the perplexity on `tokens` of the dense model cut to them (uncorrected): how Minitron's
    widths are compared."""
    def perplexity_of(kept: dict) -> float:
        return perplexity(materialize(dense, structure, dense_unit_weights(dense, structure, kept)), tokens,
                          batch_size)
    return perplexity_of
