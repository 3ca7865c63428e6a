"""Stage database: the dense model's calibration activations streamed block by block, the Hessians
of each block's output projections, structured OBS for every (layer, module), and compact storage
of each level. Under torchrun the calibration windows and the OBS work are spread over processes."""
import dataclasses
import hashlib

import torch

from pipeline import database, obs
from pipeline.run import tracking
from pipeline.blockwise import activation_bytes
from pipeline.config import ConfigError
from pipeline.database import build_database, check_units, finished_modules, model_fingerprint, obs_unit_heads
from pipeline.modeling import MODULE_TYPES, load_dense, structure_of
from pipeline.outputs import DATABASE, DATABASE_WORK, inputs_key, move_dir_into_place
from pipeline.plots import obs_losses
from pipeline.resources import (available_memory, database_output_bytes, database_working_bytes, gib,
                                require_disk)
from pipeline.stage import load_tokens, model_source, run_stage


def main(params, say, group):
    p = params.database
    model, _ = load_dense(model_source(params), params.model.dtype, params.model.revision)
    structure = structure_of(model)
    try:
        check_units(structure, p.attn_unit, p.mlp_unit)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    calib = load_tokens("calib")
    say(f"{structure.num_layers} layers, {structure.num_heads} query heads / {structure.num_kv_heads} kv heads, "
        f"{structure.intermediate_size} neurons; Hessians over {calib.numel():,} tokens, streamed block by block "
        f"on {group.device}")

    identity = {"model": model_source(params), "model_fingerprint": model_fingerprint(model),
                "calib_tokens": calib.numel(), "calib_sha256": hashlib.sha256(calib.numpy().tobytes()).hexdigest()}
    # Finished modules live outside DVC's output until the end, so a killed run resumes from them.
    work = DATABASE_WORK / inputs_key({**dataclasses.asdict(p), **identity}, (obs.__file__, database.__file__))
    spill = _activations_file(params, calib, model, structure, group, work, say)
    done = finished_modules(work)
    if done:
        say(f"resuming the interrupted database build ({done} of {2 * structure.num_layers} modules done)")

    def on_module(layer, module, losses):
        rank = f" (rank {group.rank})" if group.world > 1 else ""
        print(f"[database] layer {layer + 1}/{structure.num_layers} {module}{rank}: OBS loss at half level "
              f"{losses[len(losses) // 2]:.4g}", flush=True)

    manifest = build_database(model, structure, calib, p.levels, p.damp, work, identity, batch_size=p.batch_size,
                              hessian_dtype=getattr(torch, p.hessian_dtype), attn_unit=p.attn_unit,
                              mlp_unit=p.mlp_unit, group=group, spill_file=spill, on_module=on_module)
    if spill is not None:
        spill.unlink(missing_ok=True)
    if not group.is_main:
        return {}
    move_dir_into_place(work, DATABASE)
    tracking.log_figure(obs_losses(manifest["obs_loss"]), "obs_loss.png")
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
    run_stage("database", ("database",), main, multiprocess=True)
