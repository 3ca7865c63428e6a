"""Greedy OBS speed: `pipeline.pruning.obs.greedy_obs` against the original algorithm (`reference_greedy_obs` in
tests/test_obs.py: every removal downdates the full-size Hinv and W), measured in one run.

Problems: a random positive-definite Hessian (from 2 x in random activations, damped as the pipeline
does) and random weights, removed down to nothing at the database's K = 10 levels.
- MLP-like: in = intermediate size, out = in / 4, units of 1 column (neurons);
- attention-like: in = out = heads * 128, units of 128 columns (query heads).

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python bench/obs_speed.py [--mlp 1024 2048 4096] [--attn ...]

The original's cost per removal does not shrink as units go (its matrices keep their full size), so for
large sizes `--old-max-removals N` times only its first N removals and projects the rest linearly; those
figures are marked "projected" (slightly high: its first removals score the most candidates).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.pruning.obs import greedy_obs, prepare_hessian, removal_counts  # noqa: E402
from tests.test_obs import reference_greedy_obs  # noqa: E402


def problem(in_features: int, out_features: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * in_features, in_features, generator=gen, dtype=dtype)
    hessian = prepare_hessian(x.T @ x / x.shape[0], 0.01)
    return torch.randn(out_features, in_features, generator=gen, dtype=dtype), hessian


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--mlp", type=int, nargs="*", default=[1024, 2048, 4096], help="intermediate sizes")
    args.add_argument("--attn", type=int, nargs="*", default=[1024, 2048, 4096], help="heads * head_dim")
    args.add_argument("--head-dim", type=int, default=128)
    args.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    args.add_argument("--repeats", type=int, default=3)
    args.add_argument("--old-max-removals", type=int, default=0,
                      help="time at most this many removals of the original and project the rest (0 = all)")
    args.add_argument("--threads", type=int, default=1)
    a = args.parse_args()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    cases = [("MLP", d, d // 4, 1) for d in a.mlp] + [("attention", d, d, a.head_dim) for d in a.attn]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), {a.dtype}, "
          f"median of {a.repeats}", flush=True)
    print("| kind | in | out | unit | units | original s | new s | speedup | same kept units |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, d, out, g in cases:
        w, h = problem(d, out, dtype)
        units = d // g
        counts = removal_counts(units, 10)
        new_times, old_times = [], []
        for _ in range(a.repeats):
            new_times.append(seconds(lambda: greedy_obs(w, h, g, counts)))
        projected = 0 < a.old_max_removals < units
        if projected:
            prefix = a.old_max_removals
            for _ in range(a.repeats):
                setup = seconds(lambda: reference_greedy_obs(w, h, g, [0]))
                partial = seconds(lambda: reference_greedy_obs(w, h, g, [prefix]))
                old_times.append(setup + (partial - setup) * units / prefix)
            same = "n/a"
        else:
            for _ in range(a.repeats):
                old_times.append(seconds(lambda: reference_greedy_obs(w, h, g, counts)))
            ours, ref = greedy_obs(w, h, g, counts), reference_greedy_obs(w, h, g, counts)
            same = "yes" if all(torch.equal(x.kept_units, y.kept_units) for x, y in zip(ours, ref)) else "NO"
        old, new = statistics.median(old_times), statistics.median(new_times)
        old_text = f"{old:.2f}" + (f" (projected from {a.old_max_removals} removals)" if projected else "")
        print(f"| {kind} | {d} | {out} | {g} | {units} | {old_text} | {new:.2f} | {old / new:.1f}x | {same} |",
              flush=True)


if __name__ == "__main__":
    main()
