"""Stage export: the dense model, the searched and the uniform model as llama.cpp GGUF files
(architecture `deci`, one width per layer) in each of `export.gguf_types`: models/gguf/<model>-<type>.gguf,
so their speed can be compared in the engine people serve models with."""
from pipeline.model.export import load_pruned
from pipeline.model.gguf_export import write_gguf
from pipeline.model.structure import load_dense_model
from pipeline.run import tracking
from pipeline.run.outputs import GGUF, MODELS, atomic_dir
from pipeline.run.stage import run_stage


def main(params, say, group):
    dense, tokenizer = load_dense_model(params)
    models = {"dense": dense, **{name: load_pruned(MODELS[name]) for name in ("searched", "uniform")}}
    metrics = {}
    with atomic_dir(GGUF) as tmp:
        for name, model in models.items():
            for gguf_type in params.export.gguf_types:
                path = tmp / f"{name}-{gguf_type}.gguf"
                report = write_gguf(model, tokenizer, path, gguf_type, name=f"{params.model.name_or_path} {name}")
                say(f"{GGUF / path.name}: {report.bytes / 2**20:,.1f} MiB"
                    + (f", {report.padded_query_heads} zero query heads pad uneven groups "
                       f"(+{report.padded_params:,} parameters)" if report.padded_query_heads else "")
                    + (f", placeholders for removed {', '.join(report.placeholder_layers)}"
                       if report.placeholder_layers else "")
                    + (f", {len(report.unquantized_tensors)} tensors kept in f16 (rows not a multiple of 32)"
                       if report.unquantized_tensors else ""))
                metrics[f"{name}-{gguf_type}"] = {
                    "bytes": report.bytes, "padded_query_heads": report.padded_query_heads,
                    "padded_params": report.padded_params, "placeholders": len(report.placeholder_layers),
                    "unquantized_tensors": len(report.unquantized_tensors)}
    for path in sorted(GGUF.glob("*.gguf")):
        tracking.log_artifact(path, "gguf")
    return {"gguf": metrics}


if __name__ == "__main__":
    run_stage("export", ("model", "export"), main)
