"""The house rules, checked on the source: imports between the library's modules and packages form no
cycle (each package only imports the ones below it), and every DVC stage declares as dependencies all
the library code it runs, so a code change re-runs exactly the stages it can affect."""
import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Lower layers never import higher ones; a package's modules may import each other (without cycles).
LAYERS = [{"errors"}, {"config"}, {"run"}, {"data"}, {"train"}, {"model"}, {"pruning", "quant"}, {"search", "evaluate"}]


def _file(module: str) -> Path | None:
    for path in (ROOT / f"{module.replace('.', '/')}.py", ROOT / module.replace(".", "/") / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(module: str) -> set[str]:
    """The pipeline modules `module` imports (`from pipeline.x import y` counts y when y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(_file(module).read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {m for m in found if m.startswith("pipeline.") and _file(m) is not None
            and _file(m).name != "__init__.py"}


def _library_modules() -> list[str]:
    return [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "pipeline").rglob("*.py")
            if p.name != "__init__.py"]


def _closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_imports(name))
    return seen - {module}


def _package(module: str) -> str:
    return module.split(".")[1]


def test_no_import_cycles_between_modules():
    for module in _library_modules():
        assert module not in _closure(module), f"{module} imports itself through {sorted(_closure(module))}"


def test_packages_import_only_the_layers_below():
    layer_of = {package: i for i, layer in enumerate(LAYERS) for package in layer}
    modules = _library_modules()
    assert {_package(m) for m in modules} <= set(layer_of), "a new package needs a place in LAYERS"
    for module in modules:
        for imported in _imports(module):
            if _package(imported) != _package(module):
                assert layer_of[_package(imported)] < layer_of[_package(module)], \
                    f"{module} imports {imported}, which belongs to a layer above it"


def test_every_stage_depends_on_the_code_it_runs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        spec = stage.get("do", stage)
        script = spec["cmd"].split()[2]  # python -m stages.<name> [args]
        declared = [ROOT / dep for dep in spec["deps"] if "$" not in dep]
        needed = {_file(m) for m in _closure(script)} | {_file(script)}
        missing = [str(path.relative_to(ROOT)) for path in needed
                   if not any(path == dep or dep in path.parents for dep in declared)]
        assert not missing, f"dvc.yaml stage '{name}' runs {missing} but does not depend on it"
