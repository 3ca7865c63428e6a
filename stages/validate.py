"""Stage validate: check the whole params file (and that the model resolves) before any stage
runs, so a bad value stops `dvc repro` before DVC removes the outputs of an earlier good run.

Its output never changes content, so a successful check re-runs nothing downstream."""
import sys

from pipeline.config import ConfigError, load_params
from pipeline.modeling import ModelStructureError
from pipeline.outputs import write_json
from pipeline.resolve import check_params_against_model, describe_model

CHECKED = "checks/params.json"

if __name__ == "__main__":
    try:
        params = load_params("params.yaml")
        if params.is_demo:
            check_params_against_model(params, params.demo.num_layers, params.demo.seq_len)
        else:
            info = describe_model(params.model)
            check_params_against_model(params, info["structure"]["num_layers"], info["context"])
    except (ConfigError, ModelStructureError) as err:
        sys.exit(f"error in params.yaml: {err}")
    write_json(CHECKED, {"params.yaml": "valid"})
    print("[validate] params.yaml is valid", flush=True)
