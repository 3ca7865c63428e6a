"""The pipeline's stages, one module each, run by dvc.yaml as `python -m stages.<name>`."""
from pipeline.run.launch import relaunch_under_torchrun

# These run as compute.nproc processes (the others are a single process); they are relaunched here,
# before any stage module's imports.
relaunch_under_torchrun(("stages.database", "stages.search", "stages.finetune", "stages.size"))
