"""What every stage shares when it is interrupted: SIGINT and SIGTERM end it cleanly (temporary
outputs removed, the previous output intact, one line for the user, a non-zero exit code), and the
leftovers of a stage killed outright are removed by the next writer."""
import signal
import subprocess
import sys
import textwrap

import pytest
import yaml
from helpers import ROOT

from pipeline.run.outputs import atomic_dir, leftover_temporaries

# A stage that is interrupted while writing both kinds of output: inside atomic_dir (a finished
# output folder) and inside atomic_file (a checkpoint).
STAGE = textwrap.dedent("""
    import time
    from pathlib import Path
    from pipeline.run.outputs import atomic_dir, atomic_file
    from pipeline.run.stage import run_stage

    def body(params, say, group):
        with atomic_dir(Path("out")) as tmp:
            (tmp / "new.txt").write_text("half of a new output")
            with atomic_file(Path("work/checkpoint.pt")) as partial:
                partial.write_text("half of a checkpoint")
                say("writing")
                time.sleep(60)
        return {}

    run_stage("toy", ("search",), body)
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_signal_ends_the_stage_cleanly_with_one_line(tmp_path, sig):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tracking"]["enabled"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "stage.py").write_text(STAGE)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "previous.txt").write_text("the previous good output")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "checkpoint.pt").write_text("the previous checkpoint")
    process = subprocess.Popen([sys.executable, "stage.py"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert "thread" in process.stdout.readline()  # the stage says how it runs, then starts writing
    assert "writing" in process.stdout.readline()
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + sig  # 130 / 143: what a shell reports for "ended by SIGINT / SIGTERM"
    assert stderr == f"interrupted by {sig.name}: rerun `dvc repro` to resume\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "params.yaml", "stage.py", "work"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["previous.txt"]
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["checkpoint.pt"]
    assert (tmp_path / "work" / "checkpoint.pt").read_text() == "the previous checkpoint"


def test_the_next_writer_removes_what_a_killed_writer_left(tmp_path):
    out = tmp_path / "out"
    for leftover in (".out.k1ll3d", ".out.old"):  # atomic_dir's temporary folder, move_dir_into_place's old one
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "weights").write_text("half")
    (tmp_path / ".outside").mkdir()  # not one of out's
    assert [p.name for p in leftover_temporaries(out)] == [".out.k1ll3d", ".out.old"]
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("complete")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".outside", "out"]
    assert (out / "weights").read_text() == "complete"
