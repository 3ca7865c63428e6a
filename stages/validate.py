"""Stage validate: check the whole params file, and for a real model that it resolves, that its
tokenizer fits and that the corpora cover the token budgets, before any stage runs, so a bad value
stops `dvc repro` before DVC removes the outputs of an earlier good run.

Its output never changes content, so a successful check re-runs nothing downstream."""
import sys

from pipeline.config import ConfigError, load_params
from pipeline.data import CorpusError
from pipeline.modeling import ModelStructureError
from pipeline.outputs import write_json
from pipeline.resolve import check_compute, check_params_against_model, check_real_model, corpus_fingerprint

CHECKED = "checks/params.json"
CORPUS = "checks/data.json"  # changes only when the text changes: calibration depends on it

if __name__ == "__main__":
    try:
        params = load_params("params.yaml")
        check_compute(params)
        if params.is_demo:
            # The demo corpus only exists once the base stage has built it, so its token budgets are
            # checked by the calibration stage (same functions, same message).
            check_params_against_model(params, params.demo.num_layers, params.demo.seq_len)
        else:
            counted = check_real_model(params)
            print(f"[validate] data.train and data.eval cover the token budgets "
                  f"(counted {counted['train']:,} and {counted['eval']:,} tokens)", flush=True)
    except (ConfigError, ModelStructureError, CorpusError) as err:
        sys.exit(f"error in params.yaml: {err}")
    write_json(CHECKED, {"params.yaml": "valid"})
    write_json(CORPUS, {name: corpus_fingerprint(getattr(params.data, name)) for name in ("train", "eval")})
    print("[validate] params.yaml is valid", flush=True)
