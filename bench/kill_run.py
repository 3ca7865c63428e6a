"""A killed run, as an operator kills it: `dvc repro` of one stage in its own process group, SIGKILLed (the
whole group) when a progress line appears; then: which processes working in the workspace are left 10 s
later, and whether the same command run again at once resumes and ends with the uninterrupted run's result
(then `dvc repro` for anything downstream, and `dvc status`).

Run in a workspace whose pipeline has finished once (the uninterrupted reference), e.g. a checkout with
configs/stories260k-cpu.yaml as params.yaml (compute.nproc 2) after `dvc repro`:

    python bench/kill_run.py --stage search --at "generation 20/40" --result levels/searched.json
    python bench/kill_run.py --stage finetune@searched --at "step 6/" --result models/pruned/model.safetensors

Prints one JSON line: the processes left, the resumed run's result equal to the reference's, the one-shot
perplexity before and after (metrics/evaluate.json), and `dvc status` afterwards.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil


def workspace_processes(root: Path) -> list[psutil.Process]:
    """Processes working in `root`, other than this script and the shells that started it."""
    own = {os.getpid()} | {p.pid for p in psutil.Process().parents()}
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid not in own and p.cwd() == str(root):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def alive(processes: list[psutil.Process]) -> list[str]:
    left = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
        except psutil.NoSuchProcess:
            continue
    return left


def main():
    a = argparse.ArgumentParser(description=__doc__)
    a.add_argument("--stage", required=True)
    a.add_argument("--at", required=True, help="the progress line at which to kill")
    a.add_argument("--result", required=True, help="the stage's output to compare with the uninterrupted run's")
    args = a.parse_args()
    root = Path.cwd()
    reference = (root / args.result).read_bytes()
    ppl_before = json.loads((root / "metrics/evaluate.json").read_text())["ppl"]
    shutil.rmtree(root / ".darwinlm", ignore_errors=True)  # no finished work to reuse: the stage really runs
    command = ["dvc", "repro", "--force", "--single-item", args.stage]
    run = subprocess.Popen(command, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    for line in run.stdout:
        seen.append(line)
        if args.at in line:
            processes = workspace_processes(root)
            os.killpg(run.pid, signal.SIGKILL)
            killed_at = time.time()
            break
    else:
        raise SystemExit(f"never saw {args.at!r}:\n{''.join(seen)[-2000:]}")
    run.wait()
    time.sleep(max(0.0, 10 - (time.time() - killed_at)))
    left = alive(processes)
    started = time.time()
    resumed = subprocess.run(command, capture_output=True, text=True)  # the interrupted command, again
    rest = subprocess.run(["dvc", "repro"], capture_output=True, text=True)  # what else needs running, if anything
    status = subprocess.run(["dvc", "status"], capture_output=True, text=True).stdout.strip()
    ppl_after = json.loads((root / "metrics/evaluate.json").read_text())["ppl"]
    print(json.dumps({
        "stage": args.stage, "killed_at": args.at, "processes_at_kill": len(processes), "left_after_10s": left,
        "rerun_rc": resumed.returncode, "rerun_s": round(time.time() - started, 1), "repro_rc": rest.returncode,
        "repro_ran": [ln for ln in rest.stdout.splitlines() if ln.startswith("Running stage")],
        "resumed": [ln for ln in resumed.stdout.splitlines() if "resuming" in ln],
        "result_equal": (root / args.result).read_bytes() == reference,
        "ppl_before": ppl_before, "ppl_after": ppl_after, "dvc_status": status}))


if __name__ == "__main__":
    main()
