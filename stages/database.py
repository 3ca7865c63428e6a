"""Stage database: the dense model's calibration activations streamed block by block, the Hessians
of each block's output projections, structured OBS for every (layer, module), and compact storage
of each level. Under torchrun the calibration windows and the OBS work are spread over processes."""

import torch

from pipeline.data import load_tokens
from pipeline.model.structure import MODULE_TYPES, dense_source, load_dense_model, structure_of
from pipeline.pruning import database, obs, scored, scores
from pipeline.pruning.activation_stats import calibration_stats
from pipeline.pruning.block_stream import activation_bytes
from pipeline.pruning.database import build_database, check_units, finished_modules, obs_unit_heads
from pipeline.pruning.scored import build_scored_database
from pipeline.pruning.sizes import database_output_bytes, database_working_bytes
from pipeline.run import tracking
from pipeline.run.hashing import inputs_key, model_fingerprint, tensor_sha256
from pipeline.run.outputs import DATABASE, DATABASE_WORK, move_dir_into_place
from pipeline.run.plots import obs_losses
from pipeline.run.resources import available_memory, gib, require_disk
from pipeline.run.stage import run_stage


def main(params, say, group):
    p = params.database
    model, _ = load_dense_model(params)
    structure = structure_of(model)
    check_units(structure, p.attn_unit, p.mlp_unit)
    calib = load_tokens("calib")
    say(f"{structure.num_layers} layers, {structure.num_heads} query heads / {structure.num_kv_heads} kv heads, "
        f"{structure.intermediate_size} neurons; Hessians over {calib.numel():,} tokens, streamed block by block "
        f"on {group.device}")

    identity = {"model": dense_source(params), "model_fingerprint": model_fingerprint(model),
                "calib_tokens": calib.numel(), "calib_sha256": tensor_sha256(calib)}
    # Finished modules live outside DVC's output until the end, so a killed run resumes from them.
    work = DATABASE_WORK / inputs_key({**p.model_dump(), **identity},
                                      (obs.__file__, database.__file__, scored.__file__, scores.__file__))
    spill = _activations_file(params, calib, model, structure, group, work, say)
    done = finished_modules(work)
    if done:
        say(f"resuming the interrupted database build ({done} of {2 * structure.num_layers} modules done)")

    def on_module(layer, module, losses):
        rank = f" (rank {group.rank})" if group.world > 1 else ""
        print(f"[database] layer {layer + 1}/{structure.num_layers} {module}{rank}: {p.method} loss at half level "
              f"{losses[len(losses) // 2]:.4g}", flush=True)

    if p.method == "obs":
        manifest = build_database(model, structure, calib, p.levels, p.damp, work, identity,
                                  batch_size=p.batch_size, hessian_dtype=getattr(torch, p.hessian_dtype),
                                  attn_unit=p.attn_unit, mlp_unit=p.mlp_unit, group=group, spill_file=spill,
                                  on_module=on_module)
    else:  # a neighbouring method's database: unit scores from calibration statistics (magnitude: none)
        say(f"database.method is {p.method}: units ranked by its score, output projections uncorrected")
        stats = None if p.method == "magnitude" else calibration_stats(
            model, calib, p.batch_size, group, spill,
            on_layer=lambda layer: say(f"statistics of layer {layer + 1}/{structure.num_layers}"))
        manifest = build_scored_database(model, structure, p.method, stats, p.levels, work, identity,
                                         attn_unit=p.attn_unit, mlp_unit=p.mlp_unit,
                                         on_module=on_module) if group.is_main else None
    if spill is not None:
        spill.unlink(missing_ok=True)
    if not group.is_main:
        return {}
    move_dir_into_place(work, DATABASE)
    tracking.log_figure(obs_losses(manifest["obs_loss"], p.method), "plots/obs_loss.png")
    total = {m: sum(layer[len(layer) // 2] for layer in manifest["obs_loss"][m]) for m in MODULE_TYPES}
    return {"levels": p.levels, "obs_loss_half_level": total}


def _activations_file(params, calib, model, structure, group, work, say):
    """Print what the build needs; refuse when the disk cannot hold it. Returns the file that holds
    this rank's calibration activations, or None to hold them in memory."""
    p = params.database
    per_unit = {m: obs_unit_heads(structure, m, p.attn_unit, p.mlp_unit) for m in MODULE_TYPES}
    output = database_output_bytes(structure, p.levels, model.dtype.itemsize, per_unit)
    states = activation_bytes(len(group.shard(calib)), calib.shape[1], structure.hidden_size, model.dtype)
    free = available_memory()
    on_disk = params.compute.activations == "disk" or (
        params.compute.activations == "auto" and free is not None and states > free // 2)
    working = database_working_bytes(structure, getattr(torch, p.hessian_dtype))
    say(f"needs per process: activations {gib(states)} ({'disk' if on_disk else 'memory'}), one block's Hessians "
        f"{gib(working['hessians'])} and OBS {gib(working['obs'])} on {group.device.type}; the model "
        f"{gib(sum(t.numel() * t.element_size() for t in model.state_dict().values()))} in CPU memory; "
        f"output {gib(output)} on disk")
    require_disk(work, output + (states * group.world if on_disk else 0), "the layer database")
    return work / f"activations.rank{group.rank}.bin" if on_disk else None


if __name__ == "__main__":
    run_stage("database", ("database",), main)
