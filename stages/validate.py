"""Stage validate: check the whole params file, and for a real model that it resolves, that its
tokenizer fits and that the corpora cover the token budgets, before any stage runs, so a bad value
stops `dvc repro` before DVC removes the outputs of an earlier good run.

It runs on every `dvc repro`. Its outputs change content only when the text of a corpus changes
(checks/data.json, which calibration depends on), so a successful check re-runs nothing else."""
import json
import sys
from pathlib import Path

from pipeline.config import load_params
from pipeline.errors import UserError
from pipeline.model.resolve import (
    check_compute,
    check_optional_packages,
    check_params_against_model,
    check_paths,
    check_real_model,
    corpus_fingerprint,
)
from pipeline.run.hashing import inputs_key
from pipeline.run.outputs import write_json

CHECKED = "checks/params.json"
CORPUS = "checks/data.json"  # changes only when the text changes: calibration depends on it
# The stage runs on every `dvc repro` (so an edited corpus is noticed); a real model's checks are
# skipped when these exact params and corpus contents already passed them.
PASSED = Path(".darwinlm/validated.json")

if __name__ == "__main__":
    try:
        params = load_params("params.yaml")
        check_paths(params)
        check_compute(params)
        check_optional_packages(params)
        corpus = {name: corpus_fingerprint(getattr(params.data, name)) for name in ("train", "eval")}
        key = inputs_key({"params": params.model_dump(), "corpus": corpus})
        if params.is_demo:
            # The demo corpus only exists once the base stage has built it, so its token budgets are
            # checked by the calibration stage (same functions, same message).
            check_params_against_model(params, params.demo.num_layers, params.demo.seq_len)
        elif not (PASSED.is_file() and json.loads(PASSED.read_text()).get("key") == key):
            counted = check_real_model(params)
            print(f"[validate] data.train and data.eval cover the token budgets "
                  f"(counted {counted['train']:,} and {counted['eval']:,} tokens)", flush=True)
            write_json(PASSED, {"key": key})
    except UserError as err:
        sys.exit(f"error in params.yaml: {err}")
    write_json(CHECKED, {"params.yaml": "valid"})
    write_json(CORPUS, corpus)
    print("[validate] params.yaml is valid", flush=True)
