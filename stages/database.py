"""Stage database: Hessians of the dense model on the calib set, then structured OBS for every
(layer, module) and compact storage of each level."""
import dataclasses
import hashlib
import json

import torch

from pipeline import database, obs, tracking
from pipeline.config import ConfigError
from pipeline.database import PROGRESS, build_database, check_units, collect_hessians, model_fingerprint
from pipeline.modeling import MODULE_TYPES, load_dense, structure_of
from pipeline.outputs import DATABASE, DATABASE_WORK, inputs_key, move_dir_into_place
from pipeline.plots import obs_losses
from pipeline.stage import load_tokens, model_source, run_stage


def main(params, say):
    p = params.database
    model, _ = load_dense(model_source(params), params.model.dtype, params.model.revision)
    structure = structure_of(model)
    try:
        check_units(structure, p.attn_unit, p.mlp_unit)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    calib = load_tokens("calib")
    say(f"{structure.num_layers} layers, {structure.num_heads} query heads / {structure.num_kv_heads} kv heads, "
        f"{structure.intermediate_size} neurons; Hessians over {calib.numel():,} tokens")
    hessians = collect_hessians(model, structure, calib, p.batch_size, getattr(torch, p.hessian_dtype),
                                on_batch=lambda i, n: say(f"calibration batch {i}/{n}") if i == n or i % 10 == 0
                                else None)

    def on_module(layer, module, losses):
        say(f"layer {layer + 1}/{structure.num_layers} {module}: OBS loss at half level {losses[len(losses) // 2]:.4g}")

    identity = {"model": model_source(params), "model_fingerprint": model_fingerprint(model),
                "calib_tokens": calib.numel(), "calib_sha256": hashlib.sha256(calib.numpy().tobytes()).hexdigest()}
    # Finished layers live outside DVC's output until the end, so a killed run resumes from them.
    work = DATABASE_WORK / inputs_key({**dataclasses.asdict(p), **identity}, (obs.__file__, database.__file__))
    if (work / PROGRESS).is_file():
        say(f"resuming the interrupted database build ({len(json.loads((work / PROGRESS).read_text()))} layers done)")
    manifest = build_database(model, structure, hessians, p.levels, p.damp, work, identity=identity,
                              on_module=on_module, attn_unit=p.attn_unit, mlp_unit=p.mlp_unit)
    move_dir_into_place(work, DATABASE)
    tracking.log_figure(obs_losses(manifest["obs_loss"]), "obs_loss.png")
    total = {m: sum(layer[len(layer) // 2] for layer in manifest["obs_loss"][m]) for m in MODULE_TYPES}
    return {"levels": p.levels, "obs_loss_half_level": total}


if __name__ == "__main__":
    run_stage("database", ("database",), main)
