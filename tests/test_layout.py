"""The house flows one way: no module imports a later stage of the pipeline, and nothing imports in a cycle.

Stages, in the order data flows (README's layout section): a module may import its own stage or
earlier ones, never a later one. Every `import` counts, function-local ones included: a deferred
import is still a dependency.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "bixse_jax"

# (stage, module-name prefixes); a module belongs to the first stage whose prefix matches.
STAGES = [
    ("foundation", ("bixse_jax.errors", "bixse_jax.metric_writers", "bixse_jax.preemption")),
    ("data", ("bixse_jax.data.",)),
    ("parallel", ("bixse_jax.parallel",)),
    ("config", ("bixse_jax.default_config",)),
    ("models", ("bixse_jax.models.",)),
    ("targets and losses", ("bixse_jax.targets", "bixse_jax.losses", "bixse_jax.matryoshka", "bixse_jax.cell_stats")),
    ("logit init", ("bixse_jax.logit_init",)),  # the fit of t and b: before the training step, which refits them
    ("blocked loss", ("bixse_jax.blocked_loss",)),
    ("step", ("bixse_jax.step",)),
    ("grad_cache", ("bixse_jax.grad_cache",)),
    ("checkpoint", ("bixse_jax.checkpoint",)),
    ("eval and inference", ("bixse_jax.eval.", "bixse_jax.inference")),
    ("label", ("bixse_jax.label.",)),
    ("experiment", ("bixse_jax.experiment",)),
    ("train", ("bixse_jax.train", "bixse_jax.run_report")),
    ("export", ("bixse_jax.model_card", "bixse_jax.export")),
    ("commands", ("bixse_jax.commands.", "bixse_jax.cli")),
]
PACKAGES = {"bixse_jax", "bixse_jax.data", "bixse_jax.models", "bixse_jax.eval", "bixse_jax.commands",
            "bixse_jax.label"}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _stage(module: str) -> int:
    for i, (_, prefixes) in enumerate(STAGES):
        if any(module == p.rstrip(".") or module.startswith(p) for p in prefixes):
            return i
    raise AssertionError(f"{module} belongs to no stage of tests/test_layout.py; add it where it flows")


def _imports(path: pathlib.Path, module: str) -> set[str]:
    """bixse_jax modules that `path` imports (`from bixse_jax import x` names the module bixse_jax.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("bixse_jax")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(module.split(".")[:-node.level] + ([base] if base else []))
            if not base.startswith("bixse_jax"):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists()
                          or (PACKAGE.parent / candidate.replace(".", "/")).is_dir() else base)
    return {m for m in found if m not in PACKAGES or m == module}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {i for i in _imports(p, m) if i != m and i not in PACKAGES} for m, p in modules.items()}


def test_every_module_has_a_stage_and_imports_no_later_stage():
    graph = _graph()
    assert len(graph) > 30, "the scan found too few modules to be looking at bixse_jax"
    backward = [f"{m} ({STAGES[_stage(m)][0]}) imports {i} ({STAGES[_stage(i)][0]})"
                for m, imports in sorted(graph.items()) if m != "bixse_jax" for i in sorted(imports)
                if _stage(i) > _stage(m)]
    assert not backward, "imports against the flow:\n  " + "\n  ".join(backward)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for i in sorted(graph.get(m, ())):
            if state.get(i) == 1:
                cycle = path[path.index(i):] + [i]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if i not in state:
                visit(i, path + [i])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_scan_sees_what_it_should():
    """The checks above are only as good as the import scan: it must see deferred and `from` imports."""
    graph = _graph()
    assert "bixse_jax.step" in graph["bixse_jax.grad_cache"]  # `from bixse_jax import parallel, step`
    assert "bixse_jax.checkpoint" in graph["bixse_jax.export"]
    assert "bixse_jax.models.sentence_model" in graph["bixse_jax.inference"]
    assert _stage("bixse_jax.train") > _stage("bixse_jax.step") > _stage("bixse_jax.models.bert")


@pytest.mark.parametrize("name", ["export.py", "train.py"])
def test_long_modules_were_split(name):
    lines = len((PACKAGE / name).read_text().splitlines())
    assert lines < 300, f"bixse_jax/{name} has {lines} lines; issue 13 asks for under 300"
