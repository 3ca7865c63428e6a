"""Figures for MLflow and the README: search progress, per-layer structure, the baseline panel."""
from __future__ import annotations

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def search_curve(history: list[dict]):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    gens = [h["generation"] for h in history]
    ax.plot(gens, [h["fitness"] for h in history], marker=".")
    ax.set_xlabel("generation")
    ax.set_ylabel("parent KL to dense (final stage tokens)")
    ax.set_yscale("log")
    ax.set_title("Evolutionary search")
    fig.tight_layout()
    return fig


def layer_structure(structures: dict[str, dict], dense_heads: int, dense_neurons: int):
    """`structures[name] = {"heads": [kept per layer], "neurons": [kept per layer]}`."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    width = 0.8 / max(1, len(structures))
    for j, (name, s) in enumerate(structures.items()):
        xs = [i + j * width for i in range(len(s["heads"]))]
        axes[0].bar(xs, s["heads"], width=width, label=name)
        axes[1].bar(xs, s["neurons"], width=width, label=name)
    for ax, title, dense in ((axes[0], "query heads kept", dense_heads), (axes[1], "MLP neurons kept", dense_neurons)):
        ax.axhline(dense, color="gray", linestyle="--", linewidth=1, label="dense")
        ax.set_xlabel("layer")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def training_curve(losses: list[float], title: str):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def obs_losses(losses: dict[str, list[list[float]]], method: str = "obs"):
    """OBS reconstruction loss per level (for another `database.method`: the removed units' summed
    score), one line per layer, for attention and MLP."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, (module, per_layer) in zip(axes, losses.items()):
        for i, curve in enumerate(per_layer):
            ax.plot(range(len(curve)), [max(v, 1e-12) for v in curve], label=f"layer {i}")
        ax.set_yscale("log")
        ax.set_xlabel("level")
        ax.set_title(f"{module}: " + ("OBS loss" if method == "obs" else f"{method} score removed"))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def panel_table(panel: dict) -> list[dict]:
    """The panel as a table with one-shot and trained rows apart: one row per method one-shot (perplexity and
    KL to dense), then one row per method that was trained (`ppl_finetuned`)."""
    rows = []
    for training, key in (("one-shot", "ppl_oneshot"), ("trained", "ppl_finetuned")):
        for name, r in panel.items():
            if key in r:
                label = name if training == "one-shot" else f"{name} (trained)"
                rows.append({"label": label, "method": name, "training": training, "ppl": r[key],
                             "kl": r.get("kl") if training == "one-shot" else None,
                             **{k: v for k, v in r.items() if k not in ("ppl_oneshot", "ppl_finetuned", "kl")}})
    return rows


def baseline_panel(panel: dict):
    """Every method of the panel (`{method: {ppl_oneshot, kl, ppl_finetuned?}}`) as horizontal bars: one-shot
    perplexity and KL to dense for all, and perplexity after training in its own plot for the trained ones
    only (so no trained model stands beside an untrained one); the searched model's bars stand out."""
    trained = {n: r["ppl_finetuned"] for n, r in panel.items() if "ppl_finetuned" in r}
    plots = [("ppl_oneshot", "one-shot perplexity (eval)", {n: r["ppl_oneshot"] for n, r in panel.items()}),
             ("kl", "one-shot KL to dense per token (fitness set)", {n: r["kl"] for n, r in panel.items()})]
    if trained:
        plots.append(("ppl_finetuned", "perplexity after training (eval)", trained))
    fig, axes = plt.subplots(1, len(plots), figsize=(4.5 * len(plots), 0.5 * len(panel) + 1.5), squeeze=False)
    for ax, (_, title, values) in zip(axes[0], plots):
        names = list(values)
        ax.barh(names, list(values.values()), color=["tab:orange" if n == "searched" else "tab:blue" for n in names])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        for y, v in enumerate(values.values()):
            ax.annotate(f"{v:.3g}", (v, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        ax.margins(x=0.15)
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
    fig.tight_layout()
    return fig


def recovery_curves(curves: dict, baseline: str, sheared_tokens: int):
    """Eval perplexity against training tokens after pruning, one line per method (log-log); the one-shot
    point (0 tokens) is drawn at the first budget's half. Sheared's mask-training tokens are in its label."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    first = min(t for c in curves.values() for t in c if t > 0)
    for name, curve in curves.items():
        tokens = sorted(curve)
        label = {"baseline": f"{baseline} (one-shot baseline)",
                 "sheared": f"sheared (+{sheared_tokens:,} mask-training tokens)"}.get(name, name)
        ax.plot([t if t else first / 2 for t in tokens], [curve[t] for t in tokens], marker="o", label=label,
                color="tab:orange" if name == "searched" else None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens after pruning (one-shot at the left)")
    ax.set_ylabel("eval perplexity (held-out)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def size_panel(rows: list[dict]):
    """KL to the dense f16 model against file bytes, one point per file (llama.cpp's presets, the searches)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for kind, marker in (("preset", "s"), ("preset+imatrix", "D"), ("search", "o")):
        chosen = [r for r in rows if r["kind"] == kind]
        if chosen:
            ax.scatter([r["bytes"] / 1e6 for r in chosen], [r["kl"] for r in chosen], marker=marker, label=kind)
            for r in chosen:
                ax.annotate(r["name"], (r["bytes"] / 1e6, r["kl"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("KL to dense f16 per token (llama.cpp, held-out text)")
    ax.legend()
    fig.tight_layout()
    return fig


def genotype_picture(genotype: dict, kept: dict[str, list[int]], dense_heads: int, dense_neurons: int,
                     bits: dict[str, list[float]], title: str):
    """What a byte search chose per layer: kept query heads and MLP neurons, and each tensor's bits per weight."""
    layers = range(len(genotype["attn"]))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    top.bar([x - 0.2 for x in layers], [h / dense_heads for h in kept["heads"]], width=0.4,
            label="query heads kept")
    top.bar([x + 0.2 for x in layers], [n / dense_neurons for n in kept["neurons"]], width=0.4,
            label="MLP neurons kept")
    top.set_ylabel("fraction kept")
    top.set_ylim(0, 1.05)
    top.legend(fontsize=8)
    genes = list(bits)
    image = bottom.imshow([bits[g] for g in genes], aspect="auto", cmap="viridis", vmin=2, vmax=16)
    bottom.set_yticks(range(len(genes)), genes)
    bottom.set_xlabel("layer")
    fig.colorbar(image, ax=bottom, label="bits per weight")
    top.set_title(title)
    fig.tight_layout()
    return fig
