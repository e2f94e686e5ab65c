"""Run atomicity (issue #14): a failed or killed run leaves no version that a later run takes as
the latest, and the upstream check names inputs that come from different runs or splits."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import project_parameters, run_kedro_session
from kedro.io import DataCatalog, MemoryDataset
from kedro.io.core import Version

from fu_kedro.datasets import ImageSet, ImageSetDataset, LoraAdapterDataset
from fu_kedro.datasets.staging import STAGING, published_path
from fu_kedro.prerequisites import check_upstream_outputs, find_mixed_runs
from fu_kedro.models.lora import LoraAdapter

TINY = {"ingestion": {"phantom": {"source": {"n_per_class": 6}, "target": {"n_per_class": 3}},
                      "image_size": 48, "lora_per_class": 2, "preview": {"per_class": 1}}}
TINY_CLI = ("ingestion.phantom.source.n_per_class=6,ingestion.phantom.target.n_per_class=3,"
            "ingestion.lora_per_class=2,ingestion.preview.per_class=1")
INGESTION_OUTPUTS = {
    "source_images": "data/03_primary/source_images",
    "target_images": "data/03_primary/target_images",
    "lora_subset": "data/05_model_input/lora_subset",
    "quarantine_report": "data/08_reporting/quarantine_report.csv",
    "ingestion_preview_grid": "data/08_reporting/ingestion_preview_grid.png",
}

KILL_HOOK = '''

# --- added by tests/test_atomicity.py in this throwaway copy: SIGKILL after a named node
import os as _os
import signal as _signal

from kedro.framework.hooks import hook_impl as _hook_impl


class _KillAfterNode:
    @_hook_impl
    def after_node_run(self, node):
        if node.name == _os.environ.get("FU_TEST_KILL_AFTER_NODE"):
            _os.kill(_os.getpid(), _signal.SIGKILL)


HOOKS = (*HOOKS, _KillAfterNode())
'''


def _versions(project: Path) -> dict[str, list[str]]:
    """The published versions of each ingestion output (what Kedro's 'latest' chooses from)."""
    out = {}
    for name, rel in INGESTION_OUTPUTS.items():
        root = project / rel
        out[name] = sorted(p.name for p in root.iterdir() if (p / root.name).exists()) if root.is_dir() else []
    return out


def _staging_dirs(project: Path) -> list[Path]:
    return sorted(p for p in (project / "data").rglob(STAGING) if p.is_dir())


@pytest.mark.slow
def test_a_killed_run_leaves_nothing_the_next_run_loads(project_copy):
    """Run A publishes; run B (image_size 40) is SIGKILLed when draw_lora_subset_node has run (Kedro
    calls after_node_run before saving a node's outputs: B has saved target_images,
    source_images and maybe the quarantine report, not lora_subset); the next run loads A's source_images, never B's, and
    clears B's staging."""
    run_kedro_session(project_copy, "ingestion", TINY)
    published = _versions(project_copy)
    assert all(len(v) == 1 for v in published.values()), published
    version_a = published["source_images"][0]

    settings = project_copy / "src" / "fu_kedro" / "settings.py"
    settings.write_text(settings.read_text() + KILL_HOOK)
    # the copy's src first: conf/logging.yml imports fu_kedro before Kedro puts the project's src on the path
    path = os.pathsep.join(p for p in (str(project_copy / "src"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "FU_TEST_KILL_AFTER_NODE": "draw_lora_subset_node"}
    proc = subprocess.run([sys.executable, "-m", "kedro", "run", "--pipelines", "ingestion", "--params",
                           TINY_CLI + ",ingestion.image_size=40"],
                          cwd=project_copy, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:] + proc.stderr[-3000:]
    # B saved outputs before it died (target_images, source_images) ...
    staged = {p.name for p in (project_copy / "data").rglob("*") if STAGING in p.parts and p.parent.parent.name == p.name}
    assert {"source_images", "target_images"} <= staged and "lora_subset" not in staged, staged
    assert _staging_dirs(project_copy)
    # ... but none of them is a version anyone can load
    assert _versions(project_copy) == published

    # the next run: from the LoRA subset on, loading source_images from the catalog
    run_kedro_session(project_copy, "ingestion", TINY, from_nodes=["draw_lora_subset_node"])
    after = _versions(project_copy)
    assert after["source_images"] == [version_a] and len(after["lora_subset"]) == 2
    lora_c = ImageSetDataset(str(project_copy / INGESTION_OUTPUTS["lora_subset"]),
                             version=Version(after["lora_subset"][-1], None)).load()
    assert lora_c.images.shape[1:] == (48, 48)  # from run A's 48 px images, not B's 40 px ones
    assert not _staging_dirs(project_copy)  # B's process is gone: its staging was removed


@pytest.mark.slow
def test_a_failing_run_publishes_nothing(project_copy, fetal_planes_db_sample, tmp_path):
    """`kedro run --pipeline ingestion` with a target that leaks the source: rc 1, the message names
    the leak; target_images was saved before the check failed, yet nothing is published."""
    rows = pd.read_csv(fetal_planes_db_sample / "FETAL_PLANES_DB_data.csv", sep=";", dtype=str)
    rows = rows[rows.groupby("Plane").cumcount() < 1]  # one image per class: a 5-image copy
    (tmp_path / "fpdb" / "Images").mkdir(parents=True)
    for name in rows["Image_name"]:
        (tmp_path / "fpdb" / "Images" / f"{name}.png").write_bytes(
            (fetal_planes_db_sample / "Images" / f"{name}.png").read_bytes())
    rows.to_csv(tmp_path / "fpdb" / "FETAL_PLANES_DB_data.csv", sep=";", index=False)
    src = str(tmp_path / "fpdb")
    proc = subprocess.run([sys.executable, "-m", "kedro", "run", "--pipeline", "ingestion", "--params",
                           f"{TINY_CLI},source_format=fetal_planes_db,source_path={src},"
                           f"target_format=fetal_planes_db,target_path={src}"],
                          cwd=project_copy, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "DomainLeakError" in out and "same folder" in out and "5 file(s) read as both" in out, out[-3000:]
    assert "none of its" in out  # the hook said it published nothing
    assert _versions(project_copy) == {name: [] for name in INGESTION_OUTPUTS}
    assert not _staging_dirs(project_copy)


def test_published_path_maps_a_staged_path_back():
    staged = Path("data/03_primary/.staging/2026-01-01T00.00.00.000Z-host-12/source_images/"
                  "2026-01-01T00.00.00.000Z/source_images")
    assert published_path(staged) == Path("data/03_primary/source_images/2026-01-01T00.00.00.000Z/source_images")
    assert published_path("data/x/v/x") == Path("data/x/v/x")


# --------------------------------------------------------------------------- mixed runs / splits
class _Pipeline:
    def __init__(self, inputs):
        self._inputs = set(inputs)

    def inputs(self):
        return self._inputs


def _image_set(ids, splits, size=8) -> ImageSet:
    meta = pd.DataFrame({"image_id": ids, "patient_id": ids, "label": "brain", "split": splits})
    return ImageSet(np.full((len(ids), size, size), 100, np.uint8), meta, {"domain": "source"})


def _save(dataset_cls, root: Path, version: str, data):
    dataset_cls(str(root), version=Version(None, version)).save(data)


@pytest.fixture
def saved_runs(tmp_path):
    """Two ingestion runs (v1, v2) that put image b on different sides, and an adapter + synthetic
    batch made from run v1's LoRA subset (which holds b)."""
    roots = {n: tmp_path / n for n in ("source_images", "target_images", "lora_subset", "synthetic_batch")}
    roots["lora_adapter"] = tmp_path / "lora_adapter.safetensors"
    v1, v2 = "2026-01-01T00.00.00.000Z", "2026-01-02T00.00.00.000Z"
    ids = ["a", "b", "c", "d"]
    _save(ImageSetDataset, roots["source_images"], v1, _image_set(ids, ["train", "train", "val", "train"]))
    _save(ImageSetDataset, roots["lora_subset"], v1, _image_set(["a", "b"], ["train", "train"]))
    _save(ImageSetDataset, roots["target_images"], v1, _image_set(["t1"], ["test"]))
    meta = {"lora_subset_version": v1, "lora_subset_image_ids": json.dumps(["a", "b"])}
    _save(LoraAdapterDataset, roots["lora_adapter"], v1, LoraAdapter({"w": torch.zeros(2)}, meta))
    batch = _image_set(["s1"], ["train"])
    batch.info = {"adapter": {"catalog_version": v1}}
    _save(ImageSetDataset, roots["synthetic_batch"], v1, batch)
    # a second ingestion run: b is now a validation image
    _save(ImageSetDataset, roots["source_images"], v2, _image_set(ids, ["train", "val", "val", "train"]))
    _save(ImageSetDataset, roots["target_images"], v2, _image_set(["t1"], ["test"]))
    catalog = DataCatalog({
        **{n: ImageSetDataset(str(roots[n]), version=Version(None, None))
           for n in ("source_images", "target_images", "lora_subset", "synthetic_batch")},
        "lora_adapter": LoraAdapterDataset(str(roots["lora_adapter"]), version=Version(None, None)),
    })
    return catalog, v1, v2, roots


def test_mixed_ingestion_runs_and_splits_are_named(saved_runs):
    catalog, v1, v2, _ = saved_runs
    found = find_mixed_runs(_Pipeline(["source_images", "lora_subset"]), catalog)
    text = "\n".join(found)
    assert f"`source_images` version {v2}" in text and f"`lora_subset` version {v1}" in text
    assert "not drawn from the train side" in text and "b (val)" in text


def test_synthetic_batch_from_another_split_fails_by_default_and_warns_when_told(saved_runs, monkeypatch):
    catalog, v1, v2, roots = saved_runs
    import fu_kedro.prerequisites as prerequisites

    monkeypatch.setattr(prerequisites, "_producer", lambda name: None)
    pipeline = _Pipeline(["source_images", "synthetic_batch", "target_images"])
    run_params = {"env": None, "pipeline_names": ["evaluation"], "runtime_params": {"evaluation": {"n_seeds": 1}}}
    fail = {"prerequisites": {"on_lineage_mismatch": "fail"}}  # every profile's
    [problem], warnings = check_upstream_outputs(pipeline, catalog, fail, None, run_params)
    assert not warnings and "on_lineage_mismatch: fail" in problem.what
    assert f"`synthetic_batch` version {v1} was made by `lora_adapter` version {v1}" in problem.detail
    assert f"`source_images` version {v2}" in problem.detail and "b (val)" in problem.detail
    # the two fixes: the upstream pipelines, and the exact command pinning the versions that match (v1)
    assert "kedro run --pipelines ingestion,lora_training,synthesis --params evaluation.n_seeds=1" in problem.detail
    assert ("kedro run --pipeline evaluation --params evaluation.n_seeds=1 --load-versions "
            f"source_images:{v1},synthetic_batch:{v1},target_images:{v1}") in problem.detail
    problems, warnings = check_upstream_outputs(pipeline, catalog, {"prerequisites": {"on_lineage_mismatch": "warn"}},
                                                None, run_params)
    assert not problems
    [mix] = [w for w in warnings if isinstance(w, prerequisites.Mix)]
    assert "b (val)" in mix and mix.versions == {"synthetic_batch": v1, "source_images": v2}
    # the matching pair passes: pin source_images to the run the adapter's subset came from
    catalog_v1 = DataCatalog({**{n: catalog.get(n) for n in ("synthetic_batch", "lora_adapter")},
                              "source_images": ImageSetDataset(str(roots["source_images"]), version=Version(v1, None)),
                              "target_images": ImageSetDataset(str(roots["target_images"]), version=Version(v1, None))})
    assert find_mixed_runs(pipeline, catalog_v1) == []


def test_no_matching_versions_says_so(saved_runs, monkeypatch):
    """Only v2 of target_images kept: no saved ingestion version holds both sets, so no
    --load-versions command is printed, only the re-run."""
    catalog, v1, v2, roots = saved_runs
    import shutil

    import fu_kedro.prerequisites as prerequisites

    monkeypatch.setattr(prerequisites, "_producer", lambda name: None)
    shutil.rmtree(roots["target_images"] / v1)
    pipeline = _Pipeline(["source_images", "synthetic_batch", "target_images"])
    [problem], _ = check_upstream_outputs(pipeline, catalog, {"prerequisites": {"on_lineage_mismatch": "fail"}}, None,
                                          {"pipeline_names": ["evaluation"]})
    assert "--load-versions" not in problem.detail.replace("--load-versions <dataset>", "")
    assert "none found among the saved versions" in problem.detail
    assert "kedro run --pipelines ingestion,lora_training,synthesis" in problem.detail


def test_an_invalid_lineage_policy_stops_the_run_naming_the_key_and_the_allowed_values():
    from conftest import project_parameters
    from kedro.pipeline import Node, Pipeline

    from fu_kedro.params import ParameterChecks
    from fu_kedro.schema import ParameterError

    # the hook every `kedro run` calls first, on a pipeline with no saved inputs at all
    params = project_parameters("base", {"prerequisites": {"on_lineage_mismatch": "wran"}})
    catalog = DataCatalog({"parameters": MemoryDataset(params)})
    pipeline = Pipeline([Node(lambda params: params, "parameters", "out", name="n")])
    with pytest.raises(ParameterError, match=r"prerequisites\.on_lineage_mismatch: 'wran' in prerequisites; "
                                             "allowed values: 'fail' or 'warn'"):
        ParameterChecks().before_pipeline_run({"env": None}, pipeline, catalog)


@pytest.mark.parametrize("env", [None, "real_cpu", "paper"])
def test_every_profile_stops_on_mixed_inputs(env):
    assert project_parameters(env)["prerequisites"]["on_lineage_mismatch"] == "fail"
