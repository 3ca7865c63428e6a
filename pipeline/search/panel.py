"""The baselines on a model: what each neighbouring method chooses at the searched model's size, from the
dense model, its calibration statistics and the run's database (the math: `baselines.py`)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.model.materialize import dense_unit_weights, materialize
from pipeline.model.structure import ATTN, MLP, MODULE_TYPES, output_projection
from pipeline.pruning.activation_stats import CalibrationStats, calibration_stats
from pipeline.pruning.database import Database
from pipeline.pruning.scores import cfsp_neuron_scores
from pipeline.run.distributed import Group
from pipeline.search.baselines import (
    BASELINES,
    UniformShare,
    cfsp_kept,
    flap_biases,
    flap_kept,
    kept_params,
    method_unit_scores,
    minitron_kept,
    minitron_widths,
    shortgpt_levels,
    ziplm_levels,
)
from pipeline.search.evolution import params_table, prunable_params

NEEDS_STATS = {"flap", "cfsp", "minitron", "shortgpt"}  # from one pass of the dense model



@dataclass
class Choice:
    """What a method chose: levels of the run's database, or kept query heads and neurons per layer."""
    granularity: str  # "levels" | "units"
    chosen: dict
    detail: dict = field(default_factory=dict)  # recorded with the choice
    biases: dict | None = None  # FLAP's compensation: (layer, module) -> output bias

    def size(self, db: Database) -> int:
        if self.granularity == "levels":
            return prunable_params(db, self.chosen)
        return kept_params(db.structure, self.chosen)

    def model(self, db, dense):
        if self.granularity == "levels":
            return materialize(dense, db.structure, db.weights_for({m: self.chosen[m] for m in MODULE_TYPES}))
        return materialize(dense, db.structure, dense_unit_weights(dense, db.structure, self.chosen, self.biases))

    def record(self, db) -> dict:
        s = db.structure
        chosen = {"levels": self.chosen} if self.granularity == "levels" else {
            "kept": {m: [self.chosen[(i, m)].tolist() for i in range(s.num_layers)] for m in MODULE_TYPES}}
        return {"granularity": self.granularity, **chosen, **self.detail, "prunable_params": self.size(db)}


def choose(name: str, db, dense, stats: CalibrationStats | None, calib, target: int, slack: float, batch_size: int,
           group: Group, oneshot_ppl: Callable[[dict], float], say=lambda message: None) -> Choice:
    """The choice of baseline `name` at `target` attention+MLP parameters (± `slack`) on `dense`, whose
    database is `db`; `stats`: the dense model's calibration statistics (for flap, cfsp, minitron,
    shortgpt), `calib`: the calibration tokens (wanda_sp takes its own statistics layer by layer);
    `oneshot_ppl(kept)`: a pruned model's perplexity on the selection data (minitron picks its width by it)."""
    s, L = db.structure, db.structure.num_layers
    o_proj = [output_projection(dense, i, ATTN).weight.detach() for i in range(L)]
    down = [output_projection(dense, i, MLP).weight.detach() for i in range(L)]
    if name == "uniform_magnitude":
        share = UniformShare(s, target)
        for i in range(L):
            share.choose(i, *method_unit_scores("magnitude", s, o_proj[i], down[i], None))
        return Choice("units", share.kept)
    if name == "wanda_sp":
        share = UniformShare(s, target)

        def prune_block(layer, layer_stats):
            share.choose(layer, *method_unit_scores("wanda_sp", s, o_proj[layer], down[layer], layer_stats))
            return share.removed_columns(layer)

        say("wanda_sp: layer by layer, each scored on the already-pruned layers' outputs")
        calibration_stats(dense, calib, batch_size, group, prune_block=prune_block)
        return Choice("units", share.kept)
    if name == "flap":
        kept = flap_kept(s, o_proj, down, stats.channels, target)
        dense_biases = {(i, m): output_projection(dense, i, m).bias for i in range(L) for m in MODULE_TYPES}
        weights = {(i, ATTN): o_proj[i] for i in range(L)} | {(i, MLP): down[i] for i in range(L)}
        return Choice("units", kept, biases=flap_biases(s, kept, weights, stats.channels, dense_biases))
    if name == "cfsp":
        mlp = [dense.model.layers[i].mlp for i in range(L)]
        scores = [cfsp_neuron_scores(down[i], mlp[i].up_proj.weight, mlp[i].gate_proj.weight, stats.channels[(i, MLP)])
                  for i in range(L)]
        kept, removed = cfsp_kept(s, scores, stats.block_angular, target)
        return Choice("units", kept, {"mlp_removed_share": removed})
    if name == "minitron":
        widths = minitron_widths(s, target, slack)
        if not widths:
            raise ValueError(f"minitron: no width that is the same in every layer lands within {slack:,.0f} "
                             f"parameters of {target:,}")
        tried = [(oneshot_ppl(minitron_kept(s, stats.channels, w)), w) for w in widths]
        say("minitron widths (kv groups, heads per group, neurons) by fitness-set perplexity: "
            + ", ".join(f"{w}: {loss:.3f}" for loss, w in sorted(tried)))
        best = min(tried)[1]
        return Choice("units", minitron_kept(s, stats.channels, best), {"width": list(best)})
    table = params_table(db)
    if name == "ziplm":
        return Choice("levels", ziplm_levels(db.manifest["obs_loss"], table, target, slack))
    if name == "shortgpt":
        return Choice("levels", shortgpt_levels(stats.block_influence, table, target, slack))
    raise ValueError(f"unknown baseline {name!r}: valid are {', '.join(BASELINES)}")
