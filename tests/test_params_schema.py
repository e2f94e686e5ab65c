"""One schema per parameter block, checked once before any node runs (``fu_kedro.params``).

A misspelt key, a wrong type or a value out of range stops ``kedro run`` before the first
node with one message naming the key (dotted), its block and what the block allows; every
conf env validates; and the modules of ``fu_kedro`` import each other without a circle.
"""
from __future__ import annotations

import ast
import copy
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
from conftest import PROJECT_ROOT, copy_project, project_parameters

from fu_kedro.params import BLOCKS, ProjectParams, blocks_read, check_parameters
from fu_kedro.schema import ParameterError

ENVS = sorted(p.name for p in (PROJECT_ROOT / "conf").iterdir() if p.is_dir())


# --------------------------------------------------------------------------- conf validates
def test_the_envs_are_the_ones_the_schemas_were_checked_against():
    assert {"base", "local", "paper", "real_cpu"} <= set(ENVS)


@pytest.mark.parametrize("env", ENVS)
def test_every_conf_env_validates_every_block(env):
    params = project_parameters(env)
    check_parameters(params)  # the top level and all five blocks
    assert set(BLOCKS) <= set(params) and set(params) <= set(ProjectParams.model_fields)


def test_the_schemas_hold_no_values():
    """conf/base is the one home of values: a field is required, or optional with the default None
    (a key conf may leave out, e.g. an arm's label or a loop knob that is LoopConfig's default)."""
    from pydantic import BaseModel

    def models(annotation):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for a in get_args(annotation) for m in models(a)]

    def check(model, where):
        for name, field in model.model_fields.items():
            assert field.is_required() or field.default is None, f"{where}.{name} has the default {field.default!r}"
            for sub in models(field.annotation):
                check(sub, f"{where}.{name}")

    check(ProjectParams, "(top level)")
    for name, schema in BLOCKS.items():
        check(schema, name)


def test_the_scheduler_names_are_the_generators():
    from fu_kedro.models.generation import SCHEDULERS
    from fu_kedro.pipelines.synthesis.params import Scheduler

    assert set(get_args(Scheduler)) == set(SCHEDULERS)


def test_the_data_formats_are_the_readers():
    from fu_kedro.data_sources.readers import FORMATS
    from fu_kedro.params import DataFormat

    assert set(get_args(DataFormat)) == set(FORMATS)


def test_the_style_keys_are_the_prior_corpus_draws():
    from fu_kedro.data_sources.prior_corpus import STYLE_KEYS
    from fu_kedro.pipelines.base_training.params import Styles

    assert tuple(Styles.model_fields) == STYLE_KEYS


# --------------------------------------------------------------------------- messages, in-process
def _with(params: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(params)
    *parents, leaf = dotted.split(".")
    node = out
    for part in parents:
        node = node[part]
    node[leaf] = value
    return out


@pytest.fixture(scope="module")
def base() -> dict:
    return project_parameters("base")


@pytest.mark.parametrize("dotted, value, said", [
    ("source_fromat", "fetal_planes_db", "source_fromat: unknown key at the top level; allowed keys: seed, classes, "
                                         "source_format"),
    ("seed", "abc", "seed: 'abc' at the top level: Input should be a valid integer"),
    ("seed", True, "seed: True at the top level: Input should be a valid integer"),
    ("classes", ["brain", "brain"], "classes: ['brain', 'brain'] at the top level: classes ['brain'] are listed more"),
    ("classes", [], "classes: [] at the top level: List should have at least 1 item"),
    ("source_format", "fetal_planes", "source_format: 'fetal_planes' at the top level; allowed values: 'phantom', "),
    ("prerequisites.on_lineage_mismatch", "wran", "prerequisites.on_lineage_mismatch: 'wran' in prerequisites; "
                                                  "allowed values: 'fail' or 'warn'"),
    ("ingestion.val_fracton", 0, "ingestion.val_fracton: unknown key in ingestion; allowed keys: image_size, "),
    ("ingestion.val_fraction", 1, "ingestion.val_fraction: 1 in ingestion: Input should be less than 1"),
    ("ingestion.image_size", "abc", "ingestion.image_size: 'abc' in ingestion: Input should be a valid integer"),
    ("ingestion.lora_per_class", -1, "ingestion.lora_per_class: -1 in ingestion: Input should be greater than or "
                                     "equal to 1"),
    ("ingestion.caption_template", "a {foo} x", "ingestion.caption_template: 'a {foo} x' in ingestion: a caption "
                                                "template uses the placeholder {plane} (the class word) and no other, "
                                                "got {foo}"),
    ("ingestion.caption_template", "a photo", "no other, got none"),
    ("ingestion.caption_template", "a {plane", "no other: "),
    ("ingestion.on_bad_input", "skp", "ingestion.on_bad_input: 'skp' in ingestion; allowed values: 'fail' or 'skip'"),
    ("ingestion.required_classes.source", ["brain"], "ingestion.required_classes.source: unknown key in "
                                                     "ingestion.required_classes; allowed keys: target"),
    ("base_training.denoiser.max_step", 5, "base_training.denoiser.max_step: unknown key in base_training.denoiser"),
    ("base_training.prior.styles.gain", [1.3, 0.6], "base_training.prior.styles.gain: [1.3, 0.6] in "
                                                    "base_training.prior.styles: a [low, high] range needs low <= high"),
    ("base_training.train_on", "target", "base_training.train_on: 'target' in base_training; allowed values: "
                                         "'prior', 'source' or 'prior+source'"),
    ("lora_training.lora.max_steps", -5, "lora_training.lora.max_steps: -5 in lora_training.lora: Input should be "
                                         "greater than or equal to 1"),
    ("lora_training.lora.max_step", 5, "lora_training.lora.max_step: unknown key in lora_training.lora; allowed keys: "
                                       "max_steps, max_minutes"),
    ("lora_training.lora.mixed_precision", "fp8", "lora_training.lora.mixed_precision: 'fp8' in lora_training.lora; "
                                                  "allowed values: 'no', 'fp16' or 'bf16'"),
    ("lora_training.base_model.tiny", {}, "lora_training.base_model.tiny: unknown key in lora_training.base_model; "
                                          "allowed keys: pretrained_path"),
    ("synthesis.image_per_class", 2, "synthesis.image_per_class: unknown key in synthesis; allowed keys: "
                                     "images_per_class, "),
    ("synthesis.scheduler", "euler_ancestral", "synthesis.scheduler: 'euler_ancestral' in synthesis; allowed values: "
                                               "'dpm++_multistep', 'unipc_multistep', 'ddim' or 'euler'"),
    ("synthesis.resolution", 30, "synthesis.resolution: 30 in synthesis: Input should be a multiple of 8"),
    ("synthesis.clip_skip", "x", "synthesis.clip_skip: 'x' in synthesis; allowed: 'auto' or a valid integer"),
    ("synthesis.shard_index", 1, "synthesis: shard_index=1 is not in [0, num_shards=1)"),
    ("evaluation.train.stepz", 3, "evaluation.train.stepz: unknown key in evaluation.train; allowed keys: steps, "),
    ("evaluation.n_seeds", 0, "evaluation.n_seeds: 0 in evaluation: Input should be greater than or equal to 1"),
    ("evaluation.batching.rule", "pool", "evaluation.batching.rule: 'pool' in evaluation.batching; allowed values: "
                                         "'fixed_real' or 'pooled'"),
    ("evaluation.arms.HB.synthetic", {"ratios": 1}, "evaluation.arms.HB.synthetic: {'ratios': 1} in evaluation.arms.HB: "
                                                    "synthetic is none, all, {per_class: N} or {ratio: r}"),
    ("evaluation.arms.HB.real", {"balanced_per_class": 0}, "evaluation.arms.HB.real.balanced_per_class: 0 in "
                                                           "evaluation.arms.HB.real: Input should be greater than"),
    ("evaluation.comparisons", [["HB", "XX"]], "evaluation: comparisons ['HB', 'XX']: ['XX'] not in evaluation.arms"),
    ("evaluation.quality.scorer_arm", "HB", "evaluation.quality.scorer_arm: 'HB' is not a real-only arm of evaluation.arms"),
    ("evaluation.classes", ["brain"], "evaluation.classes: unknown key in evaluation; allowed keys: image_size, arms,"),
])
def test_a_bad_key_or_value_is_named_with_its_block_and_what_it_allows(base, dotted, value, said):
    with pytest.raises(ParameterError) as error:
        check_parameters(_with(base, dotted, value))
    text = str(error.value)
    assert said in text, text
    assert text.startswith("a bad parameter (conf/ or --params), checked before any node runs:\n  "), text


def test_every_bad_key_of_a_run_is_in_its_one_message(base):
    bad = _with(_with(_with(base, "ingestion.val_fracton", 0), "evaluation.train.stepz", 3), "seed", -1)
    with pytest.raises(ParameterError) as error:
        check_parameters(bad)
    text = str(error.value)
    assert text.startswith("3 bad parameters") and "ingestion.val_fracton" in text and "evaluation.train.stepz" in text
    assert "seed: -1 at the top level: Input should be greater than or equal to 0" in text


def test_a_run_checks_the_blocks_its_nodes_read(base):
    from fu_kedro.pipeline_registry import register_pipelines

    pipelines = register_pipelines()
    assert blocks_read(pipelines["ingestion"]) == ["ingestion"]
    assert blocks_read(pipelines["evaluation"]) == ["evaluation"]
    assert blocks_read(pipelines["synthesis"]) == ["ingestion", "synthesis"]  # the caption template, plane labels
    assert blocks_read(pipelines["__default__"]) == ["ingestion", "lora_training", "synthesis", "evaluation"]
    bad = _with(base, "evaluation.train.stepz", 3)
    check_parameters(bad, blocks_read(pipelines["ingestion"]))  # an ingestion run does not read evaluation
    with pytest.raises(ParameterError, match="evaluation.train.stepz"):
        check_parameters(bad, blocks_read(pipelines["__default__"]))


def test_a_node_given_a_bad_block_says_the_same(base):
    from fu_kedro.pipelines.evaluation.params import EvaluationParams

    cfg = EvaluationParams.from_any(base["evaluation"])
    assert EvaluationParams.from_any(cfg) is cfg and cfg.train.steps == base["evaluation"]["train"]["steps"]
    with pytest.raises(ParameterError, match=r"evaluation\.train\.stepz: unknown key in evaluation\.train"):
        EvaluationParams.from_any(_with(base, "evaluation.train.stepz", 3)["evaluation"])


# --------------------------------------------------------------------------- the real CLI
def _kedro(project: Path, pipeline: str, params: list[str]) -> tuple[int, str]:
    env = dict(os.environ, COLUMNS="200", KEDRO_DISABLE_TELEMETRY="1")
    proc = subprocess.run([sys.executable, "-m", "kedro", "run", "--pipeline", pipeline, "--params", ",".join(params)],
                          cwd=project, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, " ".join((proc.stdout + proc.stderr).split())


@pytest.fixture(scope="module")
def cli_project(project_root, tmp_path_factory) -> Path:
    return copy_project(project_root, tmp_path_factory.mktemp("params_cli"))


def _nothing_ran(project: Path, out: str) -> None:
    assert "ParameterError" in out and "checked before any node runs" in out, out[-3000:]
    assert "Running node" not in out and "Completed" not in out
    assert not (project / "data").exists()  # no version of anything was written
    if (project / "mlflow.db").exists():  # kedro-mlflow may have made its store, but opened no run
        with sqlite3.connect(project / "mlflow.db") as db:
            assert db.execute("select count(*) from runs").fetchone()[0] == 0


# The probes: each was silently ignored or failed late before the schemas. One run per pipeline
# holds several (the hook names every bad key of a run in its one message): two kedro starts, not ten.
INGESTION_PROBES = [
    ("source_fromat=fetal_planes_db", "source_fromat: unknown key at the top level"),  # was: phantoms, rc 0
    ("ingestion.val_fracton=0", "ingestion.val_fracton: unknown key in ingestion"),  # was: ignored
    ("ingestion.image_size=abc", "ingestion.image_size: 'abc' in ingestion"),
    ("seed=abc", "seed: 'abc' at the top level"),
    ("ingestion.lora_per_class=-1", "ingestion.lora_per_class: -1 in ingestion"),
    ("ingestion.caption_template=a {foo} x", "ingestion.caption_template: 'a {foo} x' in ingestion"),
]


def test_the_probes_stop_kedro_run_before_any_node_naming_each(cli_project):
    code, out = _kedro(cli_project, "ingestion", [param for param, _ in INGESTION_PROBES])
    assert code != 0 and f"{len(INGESTION_PROBES)} bad parameters" in out, out[-3000:]
    for param, said in INGESTION_PROBES:
        assert said in out, (param, out[-3000:])
    _nothing_ran(cli_project, out)


def test_a_misspelt_key_in_each_block_stops_the_default_run_naming_each(cli_project):
    misspelt = ["ingestion.val_fracton=0", "lora_training.lora.max_step=5", "synthesis.image_per_class=2",
                "evaluation.train.stepz=3"]
    out_of_range = "lora_training.lora.max_steps=-5"  # was: a KeyError inside the node
    code, out = _kedro(cli_project, "__default__", misspelt + [out_of_range])
    assert code != 0 and "5 bad parameters" in out, out[-3000:]
    for item in misspelt:
        key = item.split("=")[0]
        block = key.rsplit(".", 1)[0]
        assert f"{key}: unknown key in {block}; allowed keys:" in out, (key, out[-3000:])
    assert "lora_training.lora.max_steps: -5 in lora_training.lora" in out, out[-3000:]
    _nothing_ran(cli_project, out)


# --------------------------------------------------------------------------- no import circle
SRC = PROJECT_ROOT / "src"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, module_level: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of a module (``module_level``: those run when it is imported, not in functions)."""
    found = []

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif module_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            else:
                visit(ast.iter_child_nodes(node))

    visit(tree.body)
    return found


def import_graph(module_level: bool = True) -> dict[str, set[str]]:
    """fu_kedro module -> the fu_kedro modules it imports (a package's ``__init__`` counts; a module's own
    parent packages do not: Python imports them before the module)."""
    modules = {_module_name(p): p for p in (SRC / "fu_kedro").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in _imports(ast.parse(path.read_text()), module_level):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    candidate = ".".join(parts[:i])
                    if candidate in modules and candidate != name and not name.startswith(candidate + "."):
                        deps.add(candidate)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def test_the_modules_import_each_other_without_a_circle():
    graph = import_graph(module_level=True)
    assert "fu_kedro.params" in graph and "fu_kedro.pipelines.evaluation.params" in graph["fu_kedro.params"]
    assert cycles(graph) == [], "\n".join(" -> ".join(c) for c in cycles(graph))


def test_config_and_the_schemas_import_no_pipeline_code():
    """config.py reads conf/ only (the old check_lora_training imported lora_training's nodes, which
    import config); a block's schema imports no nodes, so the hook does not load torch."""
    everything = import_graph(module_level=False)
    assert not {m for m in everything["fu_kedro.config"] if m.startswith("fu_kedro.pipelines")}
    schemas = [m for m in everything if m.endswith(".params") or m == "fu_kedro.schema"]
    for module in schemas:
        assert not {m for m in everything[module] if m.endswith((".nodes", ".pipeline")) or ".models" in m}, module
    for cycle in cycles(everything):  # imports inside functions too: none through config or a schema
        assert not set(cycle) & {"fu_kedro.config", *schemas}, cycle


def test_the_parameter_hook_loads_no_torch():
    code = "import sys, fu_kedro.settings; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT,
                         env=dict(os.environ, PYTHONPATH=str(SRC)), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
