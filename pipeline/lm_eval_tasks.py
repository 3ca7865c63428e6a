"""Third-party evaluation of model folders with lm-evaluation-harness (`lm_eval`), including tasks
defined by local YAML files whose data are local files (offline)."""
from __future__ import annotations

from pathlib import Path


def run_lm_eval(model: str | Path, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                batch_size: int = 8, device: str = "cpu", dtype: str = "float32") -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for one model folder or hub id, loaded the ordinary Hugging Face way
    (trust_remote_code, so exported pruned folders work)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise FileNotFoundError(f"evaluate.lm_eval_tasks: unknown task(s) {', '.join(missing)}"
                                + (f" (not in lm_eval nor in '{include_path}')" if include_path else
                                   " (set evaluate.lm_eval_include_path for local task YAMLs)"))
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model},trust_remote_code=True,dtype={dtype}", tasks=tasks,
        task_manager=manager, device=device, batch_size=batch_size, limit=limit)["results"]
    return {task: {metric.split(",")[0]: value for metric, value in values.items()
                   if isinstance(value, (int, float)) and not metric.startswith("sample_len")
                   and "stderr" not in metric}
            for task, values in results.items()}
