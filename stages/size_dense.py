"""Stage size_dense: what every file-size budget compares against and needs (docs/method.md, "Size in bytes"):
the calibration importance weights (llama.cpp's imatrix), the dense model as an f16 GGUF (the reference for
KL), and llama.cpp's own presets of it (`size.presets`), each also rewritten with the importance weights
(the same per-tensor types as llama.cpp chose, quantized with the imatrix). Nothing runs while
`size.budgets` is empty."""
from safetensors.torch import save_file

from pipeline.data import load_tokens
from pipeline.model.gguf_export import tensor_role, write_gguf
from pipeline.pruning.database import open_with_dense_model
from pipeline.quant.export import write_typed_gguf
from pipeline.quant.importance import column_importance, export_importance
from pipeline.quant.presets import quantize_file, tensor_types
from pipeline.run.outputs import SIZE_DENSE, SIZE_IMPORTANCE, atomic_dir, write_json
from pipeline.run.stage import run_stage


def main(params, say, group):
    s = params.size
    with atomic_dir(SIZE_DENSE) as tmp:
        if not s.budgets:
            write_json(tmp / "sizes.json", {})
            say("size.budgets is empty: no file-size search")
            return {"skipped": True}
        db, model, tokenizer = open_with_dense_model(params, group.device)
        calib = load_tokens("calib")
        say(f"importance weights (imatrix) over {calib.numel():,} calibration tokens")
        importance = column_importance(model, calib, params.database.batch_size)
        save_file(importance, str(tmp / SIZE_IMPORTANCE.name))
        dense_levels = {"attn": [0] * db.structure.num_layers, "mlp": [0] * db.structure.num_layers}
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        weights = export_importance(importance, db, dense_levels, tied)
        name = params.model.name_or_path
        f16 = tmp / "dense-f16.gguf"
        sizes = {"f16": write_gguf(model, tokenizer, f16, "f16", name=f"{name} dense").bytes}
        for preset in s.presets:
            plain = tmp / f"dense-{preset}.gguf"
            quantize_file(f16, plain, preset)
            sizes[preset] = plain.stat().st_size
            types = {n: t for n, t in tensor_types(plain).items() if tensor_role(n) is not None}
            report = write_typed_gguf(model, tokenizer, tmp / f"dense-{preset}-imatrix.gguf", types, weights,
                                      name=f"{name} dense {preset}")
            sizes[f"{preset}-imatrix"] = report.bytes
            say(f"dense {preset}: {sizes[preset] / 1e6:.1f} MB (llama.cpp), with imatrix {report.bytes / 1e6:.1f} MB")
        write_json(tmp / "sizes.json", sizes)
    return {"bytes": sizes}


if __name__ == "__main__":
    run_stage("size_dense", ("size",), main)
