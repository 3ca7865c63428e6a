"""Stage size_panel: every file of the file-size budgets measured in llama.cpp on evaluation text no decision
saw (`size.eval_windows` windows of the eval set): KL to the dense f16 file, top-1 agreement, perplexity,
bits per weight, prefill and decode speed (interleaved rounds, with spread). Rows: llama.cpp's presets of the
dense model with and without importance weights, and each budget's searches; a search row outside
`search.budget_tolerance` of its budget is marked. metrics/size_panel.json, plots/size_panel.csv (KL against
bytes, `dvc plots`), and per-layer pictures of each search's choices."""
import pandas as pd

from pipeline.data import load_tokens
from pipeline.evaluate import gguf_quality, llama_cpp_speed
from pipeline.model.gguf_export import tensor_role
from pipeline.quant.budget import LAYER_GENES
from pipeline.quant.types import bits_per_weight
from pipeline.run import tracking
from pipeline.run.outputs import PLOTS, SIZE, SIZE_DENSE, SIZE_PANEL, atomic_dir, read_json, write_text
from pipeline.run.plots import genotype_picture, size_panel
from pipeline.run.stage import run_stage

COLUMNS = ["name", "kind", "budget", "bytes", "bits_per_weight", "kl", "top1_agreement", "ppl", "within_tolerance",
           "prefill_tokens_per_s", "prefill_spread", "decode_ms_per_token", "decode_spread"]


def files(params) -> dict[str, dict]:
    """name -> {path, kind, budget} of every file to measure."""
    out = {}
    for preset in params.size.presets:
        out[f"dense-{preset}"] = {"path": SIZE_DENSE / f"dense-{preset}.gguf", "kind": "preset", "budget": ""}
        out[f"dense-{preset}-imatrix"] = {"path": SIZE_DENSE / f"dense-{preset}-imatrix.gguf",
                                          "kind": "preset+imatrix", "budget": ""}
    for budget in params.size.budgets:
        summary = read_json(SIZE / str(budget) / "budget.json")
        for row, result in summary["rows"].items():
            if result.get("reachable"):
                out[f"{row}@{budget}"] = {"path": SIZE / str(budget) / f"{row}.gguf", "kind": "search",
                                          "budget": str(budget), "within_tolerance": result["within_tolerance"]}
    return out


def main(params, say, group):
    s = params.size
    pictures = PLOTS / "size"
    if not s.budgets:
        write_text(SIZE_PANEL, ",".join(COLUMNS) + "\n")
        with atomic_dir(pictures) as tmp:
            (tmp / "README.md").write_text("No file-size budgets (size.budgets is empty).\n")
        say("size.budgets is empty: nothing to measure")
        return {"skipped": True}
    measured = files(params)
    eval_set = load_tokens("eval")[: s.eval_windows]
    windows = [row.tolist() for row in eval_set]
    reference = SIZE_DENSE / "dense-f16.gguf"
    say(f"{len(measured)} files in llama.cpp on {len(windows)} windows of {len(windows[0])} eval tokens")
    quality = gguf_quality(reference, {n: f["path"] for n, f in measured.items()}, windows)
    say(f"speed: {s.speed_repeats} interleaved rounds of {len(measured) + 1} files")
    speed = llama_cpp_speed({"dense-f16": reference, **{n: f["path"] for n, f in measured.items()}},
                            prompt_len=params.data.seq_len, decode_tokens=32, repeats=s.speed_repeats)
    rows = [{"name": "dense-f16", "kind": "reference", "budget": "", "bytes": reference.stat().st_size,
             "kl": 0.0, "top1_agreement": 1.0, "ppl": quality["reference"]["ppl"], "within_tolerance": ""}]
    for name, f in measured.items():
        rows.append({"name": name, "kind": f["kind"], "budget": f["budget"], "bytes": f["path"].stat().st_size,
                     **quality[name], "within_tolerance": f.get("within_tolerance", "")})
    for row in rows:
        path = reference if row["name"] == "dense-f16" else measured[row["name"]]["path"]
        row["bits_per_weight"] = _weight_bits(path)
        sp = speed[row["name"]]
        row.update({k: sp[k] for k in ("prefill_tokens_per_s", "prefill_spread", "decode_ms_per_token",
                                       "decode_spread")})
    table = pd.DataFrame(rows, columns=COLUMNS)
    write_text(SIZE_PANEL, table.to_csv(index=False))
    tracking.log_table(table, "size_panel.json")
    tracking.log_figure(size_panel([r for r in rows if r["kind"] != "reference"]), "plots/size_panel.png")
    with atomic_dir(pictures) as tmp:
        (tmp / "README.md").write_text("Per budget and search row: kept heads / neurons and bits per weight per "
                                       "layer, as the search chose them.\n")
        for budget in s.budgets:
            for row in s.rows:
                path = SIZE / str(budget) / f"{row}.json"
                if path.is_file():
                    _picture(read_json(path), f"{row} at {budget}", tmp / f"{budget}-{row}.png")
    for row in rows:
        mark = "" if row["within_tolerance"] in ("", True) else "  (OFF BUDGET)"
        say(f"{row['name']:28s} {row['bytes'] / 1e6:8.1f} MB {row['bits_per_weight']:5.2f} bpw  KL {row['kl']:.4f}  "
            f"top-1 {row['top1_agreement']:.3f}  ppl {row['ppl']:.2f}  prefill {row['prefill_tokens_per_s']:.0f} t/s  "
            f"decode {row['decode_ms_per_token']:.2f} ms{mark}")
        tracking.log_metrics({f"{row['name']}.{k}": row[k] for k in ("kl", "top1_agreement", "ppl", "bytes")})
    return {"rows": {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in rows}}


def _weight_bits(path) -> float:
    """Bits per weight of the file's 2-D weights (norms and biases left out)."""
    import gguf
    tensors = [t for t in gguf.GGUFReader(path).tensors if tensor_role(t.name) is not None]
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def _picture(record: dict, title: str, out) -> None:
    layers = len(record["genotype"]["attn"])
    bits = {g: [0.0] * layers for g in LAYER_GENES}
    for name, kind in record["tensor_types"].items():
        if name.startswith("blk.") and tensor_role(name) in bits:
            bits[tensor_role(name)][int(name.split(".")[1])] = bits_per_weight(kind)
    fig = genotype_picture(record["genotype"], {"heads": record["kept_heads"], "neurons": record["kept_neurons"]},
                           record["dense_heads"], record["dense_neurons"], bits, title)
    fig.savefig(out, dpi=90)
    tracking.log_figure(fig, f"plots/size/{out.name}")


if __name__ == "__main__":
    run_stage("size_panel", ("size",), main)
