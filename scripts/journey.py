#!/usr/bin/env python
"""User-journey check: the two web UIs a researcher opens after a run, in a real browser.

1. ``kedro viz run`` (loopback, free port, no browser): kedro-viz's API must list the
   pipelines ``ingestion``, ``lora_training``, ``synthesis`` and ``evaluation`` with their
   nodes, and headless Chromium must draw every one of those nodes, by name: all pipelines
   at once with datasets hidden, so that the labels can be read (``?types=nodes`` ->
   ``kedro_viz.png``), then each pipeline with its datasets (``?pid=<pipeline>`` ->
   ``kedro_viz_<pipeline>.png``).
   The API must list the layers 01_raw -> 02_intermediate -> 03_primary -> 05_model_input ->
   06_models -> 07_model_output -> 08_reporting (named after the data/ folders) with every
   dataset in one, each pipeline's view in that order too, and no ``*_mlflow`` copy; the synthesis pipeline is
   opened with ``synthetic_preview_grid`` selected and its side panel must show the saved
   grid as an image -> ``kedro_viz_preview.png`` (the dataset must have a saved version).
2. ``mlflow ui`` on the project's tracking store (the ``server.mlflow_tracking_uri`` of
   conf/<env>/mlflow.yml, by default ``sqlite:///<project>/mlflow.db``): the latest run
   holding a ``zero_shot`` metric (what the evaluation pipeline logs through
   ``zero_shot_headline_metrics``) is opened in Chromium, its metric table filtered to
   ``zero_shot``, and the page must show every one of those metric names ->
   ``mlflow_run.png``. The latest run with logged input datasets (preferably one that read a
   ``synthetic_batch`` made by another run) is opened and its Datasets panel must name them
   -> ``mlflow_run_datasets.png``. The latest two runs with different
   ``lora_training.lora.rank`` are opened in MLflow's compare view, which must show both
   ranks and the headline metrics (``fidelity``, ``accuracy_<arm>``,
   ``HB_minus_ES_accuracy`` ...) -> ``mlflow_compare.png``.

Usage (from the project root; the machine is shared, so keep it at low priority)::

    nice -n 19 python scripts/journey.py                  # screenshots to docs/journey/
    nice -n 19 python scripts/journey.py --out /tmp/j     # elsewhere
    nice -n 19 python scripts/journey.py --tracking-uri sqlite:////path/to/other.db

What it needs and installs when missing (from the package registries only): Debian's
``chromium`` and ``fonts-inter`` (kedro-viz's font; ``apt-get install -y chromium
fonts-inter``, as root) and the ``playwright`` Python package, which drives that system
Chromium (``executable_path``). Playwright's own browser download is never used, and the
browser is let talk only to the servers started here. ``--no-install`` only looks.

Cost, measured here (2 shared cores): with everything installed a run takes 40 s to
2.5 min depending on the load, most of it kedro-viz importing the project; on the same
machine without Chromium the installs added about 25 s (``apt-get update`` 1-4 s,
``apt-get install --no-install-recommends chromium fonts-inter`` 16 s, pip 4 s).

Exit status: 0 every check passed; 1 a check failed; 3 no usable Chromium (not installable
or does not start), so nothing was checked. The servers it starts are always stopped (their
whole process groups), whatever happens.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ("ingestion", "lora_training", "synthesis", "evaluation")
ZERO_SHOT = "zero_shot"
EXIT_OK, EXIT_FAILED, EXIT_NO_BROWSER = 0, 1, 3
CHROMIUM_NAMES = ("chromium", "chromium-browser")

# No network at run time, and no telemetry, for every process started here.
QUIET_ENV = {
    "KEDRO_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    # mlflow 3 starts ~7 job-runner processes (huey) next to the UI unless told not to
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}


class BrowserUnavailable(RuntimeError):
    """Chromium or its Python driver cannot be installed or started."""


# --------------------------------------------------------------------------- results


@dataclass
class Report:
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((name, ok, detail))
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)
        return ok

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(ok for _, ok, _ in self.checks)

    def summary(self) -> str:
        width = max(len(name) for name, _, _ in self.checks) if self.checks else 0
        lines = ["", "user journey summary"]
        lines += [f"  {'PASS' if ok else 'FAIL'}  {name:<{width}}  {detail}" for name, ok, detail in self.checks]
        n_ok = sum(ok for _, ok, _ in self.checks)
        lines.append(f"journey: {n_ok} of {len(self.checks)} checks passed -> {'PASS' if self.ok else 'FAIL'}")
        return "\n".join(lines)


_T0 = time.monotonic()


def log(msg: str) -> None:
    """One progress line, with the seconds since the start (so install costs are visible)."""
    print(f"[journey +{time.monotonic() - _T0:5.0f}s] {msg}", flush=True)


# --------------------------------------------------------------------------- installs


def _nice(cmd: list[str]) -> list[str]:
    return (["nice", "-n", "19"] + cmd) if shutil.which("nice") else cmd


def _run_install(cmd: list[str], timeout: float) -> tuple[bool, str]:
    log("installing: " + " ".join(cmd))
    try:
        proc = subprocess.run(_nice(cmd), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{' '.join(cmd)}: {exc}"
    out = (proc.stdout + proc.stderr).strip().splitlines()
    log(f"{'done' if proc.returncode == 0 else f'failed ({proc.returncode})'}: {' '.join(cmd[:4])} ...")
    return proc.returncode == 0, "\n".join(out[-15:])


def find_chromium() -> str | None:
    explicit = os.environ.get("JOURNEY_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def has_inter_font() -> bool:
    """kedro-viz's font (Inter) comes from Google Fonts, which a loopback-only page cannot
    reach; Debian's ``fonts-inter`` makes the screenshots look as they do online."""
    return any(Path("/usr/share/fonts").rglob("Inter*.otf")) or any(Path("/usr/share/fonts").rglob("Inter*.ttf"))


def ensure_chromium(install: bool) -> str:
    """Path of the system Chromium; ``apt-get install -y chromium fonts-inter`` first when
    missing (the font is optional: without it the pages use a fallback sans-serif)."""
    path = find_chromium()
    missing = ([] if path else ["chromium"]) + ([] if has_inter_font() else ["fonts-inter"])
    if not missing or not install:
        if not path:
            raise BrowserUnavailable("chromium not found and --no-install given (apt-get install -y chromium)")
        return path
    prefix = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if not shutil.which("apt-get") or prefix is None:
        if path:
            log(f"{' '.join(missing)} not installed (needs root and apt-get); using a fallback font")
            return path
        raise BrowserUnavailable("chromium not found; installing it needs root and apt-get (apt-get install -y chromium)")
    ok, out = _run_install(prefix + ["apt-get", "update", "-qq"], timeout=600)
    if not ok:
        log(f"apt-get update failed (trying the install anyway):\n{out}")
    ok, out = _run_install(prefix + ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                           timeout=1200)
    if not ok and "chromium" in missing:  # the font may be what failed: Chromium alone is enough
        ok, out = _run_install(prefix + ["apt-get", "install", "-y", "-q", "chromium"], timeout=1200)
    path = find_chromium()
    if not path:
        raise BrowserUnavailable(f"apt-get install -y chromium failed:\n{out}")
    if not has_inter_font():
        log("fonts-inter not installed; the kedro-viz screenshots use a fallback font")
    return path


def ensure_playwright(install: bool):
    """``playwright.sync_api.sync_playwright``; ``pip install playwright`` first when missing.
    Only the Python package: the browser is the system Chromium."""
    try:
        from playwright.sync_api import sync_playwright
        return sync_playwright
    except ImportError:
        if not install:
            raise BrowserUnavailable("the playwright package is missing and --no-install given (pip install playwright)")
    ok, out = _run_install([sys.executable, "-m", "pip", "install", "-q", "playwright"], timeout=900)
    if not ok:
        raise BrowserUnavailable(f"pip install playwright failed:\n{out}")
    import importlib

    importlib.invalidate_caches()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise BrowserUnavailable(f"playwright installed but cannot be imported: {exc}") from exc
    return sync_playwright


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    """A free loopback port below 49152: ``kedro viz run`` refuses ports above 49151 (and the
    kernel's own choice, ``bind(0)``, is usually above)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(20000, 49151)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port between 20000 and 49151 on 127.0.0.1")


class Server:
    """A server process in its own process group (so all of its workers are stopped together)."""

    def __init__(self, name: str, cmd: list[str], cwd: Path, log_dir: Path):
        self.name, self.cmd = name, cmd
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        log(f"starting {name}: {' '.join(cmd)}")
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     env={**os.environ, **QUIET_ENV})
        self.pgid = self.proc.pid  # start_new_session: the leader's pid is the group id

    def tail(self, n: int = 25) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def wait_http(self, url: str, timeout: float) -> tuple[bool, str]:
        """Poll ``url`` until it answers 200, the process dies, or ``timeout`` s pass."""
        deadline, last = time.monotonic() + timeout, "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False, f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
            try:
                with urllib.request.urlopen(url, timeout=10) as resp:
                    if resp.status == 200:
                        return True, ""
                    last = f"HTTP {resp.status}"
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(2)
        return False, f"{url} did not answer within {timeout:.0f} s ({last}):\n{self.tail()}"

    def stop(self) -> None:
        """SIGTERM the whole group, SIGKILL what is left after a grace period."""
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                self.proc.poll()
                if not _group_alive(self.pgid):
                    break
                time.sleep(0.25)
            if not _group_alive(self.pgid):
                break
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()
        log(f"stopped {self.name} (process group {self.pgid})")


def _group_alive(pgid: int) -> bool:
    """True while a live (non-zombie) process of the group exists."""
    proc_dir = Path("/proc")
    if proc_dir.is_dir():
        for stat in proc_dir.glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
                return True
        return False
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def get_json(url: str, timeout: float = 60) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read().decode("utf-8"))


# --------------------------------------------------------------------------- MLflow


def project_tracking_uri(project: Path, env: str | None) -> str:
    """``server.mlflow_tracking_uri`` from the project's config (so conf/local or ``--env``
    overrides count), falling back to the conf/base default ``sqlite:///<project>/mlflow.db``.

    Reads the config with the project's own config loader settings only: no Kedro session,
    so no hook runs (kedro-mlflow's would create the store and the experiment)."""
    default = f"sqlite:///{(project / 'mlflow.db').as_posix()}"
    try:
        from kedro.framework.project import settings
        from kedro.framework.startup import bootstrap_project

        bootstrap_project(project)
        loader = settings.CONFIG_LOADER_CLASS(
            conf_source=str(project / settings.CONF_SOURCE), env=env, **settings.CONFIG_LOADER_ARGS)
        loader.config_patterns.setdefault("mlflow", ["mlflow*", "mlflow*/**", "**/mlflow*"])
        uri = loader["mlflow"]["server"]["mlflow_tracking_uri"]
    except Exception as exc:  # noqa: BLE001 - a broken conf must not hide the journey
        log(f"could not read conf mlflow.yml ({type(exc).__name__}: {exc}); using {default}")
        return default
    if not uri:  # kedro-mlflow: null -> $MLFLOW_TRACKING_URI, else mlruns/
        uri = os.environ.get("MLFLOW_TRACKING_URI", "mlruns")
    return absolute_uri(str(uri), project)


def absolute_uri(uri: str, project: Path) -> str:
    """Relative local stores (``sqlite:///mlflow.db``, ``mlruns``) are relative to the project,
    as in kedro-mlflow; the script and the servers may run elsewhere."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(project / uri[len('sqlite:///'):]).as_posix()}"
    if "://" not in uri and ":" not in uri[:3]:
        return (project / uri).resolve().as_uri()
    return uri


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(unquote(uri[len("sqlite:///"):]))


def find_zero_shot_run(tracking_uri: str) -> tuple[dict | None, str]:
    """The latest run (any experiment) with a metric key containing ``zero_shot``.

    Returns ``({run_id, experiment_id, name, start_time, metrics}, "")`` or ``(None, why)``.
    A missing SQLite file is reported, never created.
    """
    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        return None, f"no MLflow store at {db} (run `kedro run` first)"
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    if not experiments:
        return None, f"no experiment in {tracking_uri}"
    token = None
    while True:
        page = client.search_runs([e.experiment_id for e in experiments], order_by=["attributes.start_time DESC"],
                                  max_results=200, page_token=token)
        for run in page:
            metrics = {k: v for k, v in run.data.metrics.items() if ZERO_SHOT in k}
            if metrics:
                return {
                    "run_id": run.info.run_id,
                    "experiment_id": run.info.experiment_id,
                    "name": run.info.run_name,
                    "start_time": run.info.start_time,
                    "metrics": metrics,
                }, ""
        token = page.token
        if not token:
            break
    return None, (f"no run in {tracking_uri} has a '{ZERO_SHOT}' metric "
                  "(run `kedro run --pipeline evaluation`, or the whole `kedro run`, first)")


RANK_PARAM = "lora_training.lora.rank"
HEADLINE = ("fidelity", "HB_minus_ES_accuracy")  # <arm>_minus_<arm>_accuracy of the first comparison


def _all_runs(tracking_uri: str) -> list:
    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        return []
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    if not experiments:
        return []
    return list(client.search_runs([e.experiment_id for e in experiments], order_by=["attributes.start_time DESC"],
                                   max_results=1000))


def find_dataset_run(tracking_uri: str) -> tuple[dict | None, str]:
    """The latest run with logged input datasets; one that read a ``synthetic_batch`` made by
    another run (tag ``input.synthetic_batch.run_id``) is preferred."""
    runs = [r for r in _all_runs(tracking_uri) if r.inputs and r.inputs.dataset_inputs]
    if not runs:
        return None, f"no run in {tracking_uri} logged input datasets (run the pipelines one by one first)"
    linked = [r for r in runs if "input.synthetic_batch.run_id" in r.data.tags]
    run = (linked or runs)[0]
    return {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "name": run.info.run_name,
            "datasets": sorted({d.dataset.name for d in run.inputs.dataset_inputs}),
            "upstream": run.data.tags.get("input.synthetic_batch.run_id")}, ""


def _run_dict(r) -> dict:
    return {"run_id": r.info.run_id, "experiment_id": r.info.experiment_id, "name": r.info.run_name,
            "rank": r.data.params.get(RANK_PARAM), "params": dict(r.data.params), "metrics": dict(r.data.metrics)}


def find_compare_pair(tracking_uri: str) -> tuple[list[dict] | None, str]:
    """The latest two finished runs with headline metrics and different names (two LoRA ranks
    preferred): what a researcher puts side by side in MLflow's compare view."""
    runs = [r for r in _all_runs(tracking_uri) if r.info.status == "FINISHED" and HEADLINE[0] in r.data.metrics]
    pairs = [(a, b) for i, a in enumerate(runs) for b in runs[i + 1:] if a.info.run_name != b.info.run_name]
    ranks = [(a.data.params.get(RANK_PARAM), b.data.params.get(RANK_PARAM)) for a, b in pairs]
    # two runs that both trained a LoRA, with different ranks (a run without lora_training has no rank)
    ranked = [p for p, (ra, rb) in zip(pairs, ranks) if ra is not None and rb is not None and ra != rb]
    if not pairs:
        return None, (f"no two finished runs in {tracking_uri} with '{HEADLINE[0]}' and different names "
                      "(e.g. `kedro run --params lora_training.lora.rank=4` and `=8`)")
    first, second = (ranked or pairs)[0]
    return [_run_dict(second), _run_dict(first)], ""


find_rank_pair = find_compare_pair  # the name tests/test_journey.py uses


def find_runs_list(tracking_uri: str) -> tuple[dict | None, str]:
    """The experiment of the latest finished run, and its latest runs' names (they must differ)."""
    runs = [r for r in _all_runs(tracking_uri) if r.info.status == "FINISHED"]
    if len(runs) < 2:
        return None, f"fewer than two finished runs in {tracking_uri}"
    exp = runs[0].info.experiment_id
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(tracking_uri=tracking_uri).get_experiment(exp).tags
    latest = [r for r in runs if r.info.experiment_id == exp][:6]
    return {"experiment_id": exp, "kind": tags.get("mlflow.experimentKind"),
            "names": [r.info.run_name for r in latest]}, ""


def artifact_root_for(tracking_uri: str, project: Path) -> Path:
    db = sqlite_path(tracking_uri)
    if db is not None and db.resolve().parent != project.resolve():
        return db.resolve().parent / "mlartifacts"
    return project / "mlartifacts"


# --------------------------------------------------------------------------- browser pages

VIZ_VIEWPORT = {"width": 1920, "height": 1200}
MLFLOW_VIEWPORT = {"width": 1600, "height": 1300}

# kedro-viz keeps its UI state in localStorage["KedroViz"]: start without the feature tour
# and the minimap (they cover parts of the graph), with the sidebar open (it names the
# selected pipeline and lists its nodes and datasets in a readable size).
VIZ_INIT_SCRIPT = ("window.localStorage.setItem('KedroViz', JSON.stringify("
                   "{showFeatureHints: false, visible: {miniMap: false, sidebar: true}}))")

# Node labels, the box around the drawn nodes, and the right edge of the sidebar/toolbar
# that covers the left of the chart (all in CSS pixels of the viewport).
VIZ_LAYOUT_JS = """() => {
  const rect = el => el.getBoundingClientRect();
  const nodes = [...document.querySelectorAll('.pipeline-node')].map(rect);
  const tasks = [...document.querySelectorAll('.pipeline-node--task text')].map(t => t.textContent.trim());
  const covers = [...document.querySelectorAll('.pipeline-sidebar, .pipeline-toolbar')].map(e => rect(e).right);
  const box = nodes.length ? [Math.min(...nodes.map(b => b.left)), Math.min(...nodes.map(b => b.top)),
                              Math.max(...nodes.map(b => b.right)), Math.max(...nodes.map(b => b.bottom))] : null;
  return {tasks, box, chartLeft: covers.length ? Math.max(...covers) : 0};
}"""


def local_requests_only(context, viz_version: str | None, other_hosts: tuple[str, ...] = ()) -> None:
    """The browser talks to the servers started here (and ``other_hosts``) and nothing else.

    kedro-viz's page asks Google Fonts for its font (offline: fails, the installed
    ``fonts-inter`` is used) and ``/api/version``, which makes the server ask PyPI for the
    latest release and, offline, the page then shows "Kedro-Viz None is here!" over the
    graph. The version is answered here as kedro-viz's static build does (installed =
    latest); every other request off loopback is aborted."""
    body = json.dumps({"installed": viz_version, "is_outdated": False, "latest": viz_version})

    def handle(route):
        url = urlparse(route.request.url)
        if url.hostname not in ("127.0.0.1", "localhost", "::1", *other_hosts):
            return route.abort()
        if viz_version and url.path == "/api/version":
            return route.fulfill(status=200, content_type="application/json", body=body)
        return route.continue_()

    context.route("**/*", handle)


def installed_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def dismiss_viz_popups(page) -> None:
    """kedro-viz's feature tour and its release banner, if they show despite the settings."""
    for selector in (".feature-hints__close", "button:has-text('Dismiss')"):
        try:
            loc = page.locator(selector)
            if loc.count() and loc.first.is_visible():
                loc.first.click(timeout=3000)
                page.wait_for_timeout(300)
        except Exception:  # noqa: BLE001 - cosmetic only
            pass


def fit_graph(page, margin: int = 12, tries: int = 8) -> dict:
    """Make the whole graph visible beside the sidebar.

    kedro-viz's zoom-to-fit leaves a wide graph (evaluation's 15 report outputs in one row)
    a few percent wider than the chart, under the sidebar; zoom out in small wheel steps
    around the chart's centre until every node is inside. Returns the last layout."""
    width, height = page.viewport_size["width"], page.viewport_size["height"]
    layout = page.evaluate(VIZ_LAYOUT_JS)
    for _ in range(tries):
        box, left = layout["box"], layout["chartLeft"]
        if not box or (box[0] >= left + margin and box[2] <= width - margin
                       and box[1] >= margin and box[3] <= height - margin):
            break
        page.mouse.move((left + width) / 2, (box[1] + box[3]) / 2)
        page.mouse.wheel(0, 40)  # d3-zoom: about 5 % smaller per step
        page.wait_for_timeout(700)
        layout = page.evaluate(VIZ_LAYOUT_JS)
    return layout


def render_viz(page, url: str, n_tasks: int, screenshot: Path, timeout_ms: int) -> tuple[list[str], str]:
    """Open ``url``, wait until ``n_tasks`` task nodes are drawn and the layout stops moving,
    fit the graph into the view, screenshot; return the labels of the drawn task nodes."""
    page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
    note = ""
    try:
        page.wait_for_function("n => document.querySelectorAll('.pipeline-node--task').length >= n",
                               arg=max(n_tasks, 1), timeout=timeout_ms)
    except Exception as exc:  # noqa: BLE001 - reported through the count below
        note = f"(waited {timeout_ms // 1000} s: {type(exc).__name__}) "
    # the layout is computed off the main thread and then animated into place
    last, deadline = None, time.monotonic() + 20
    while time.monotonic() < deadline:
        page.wait_for_timeout(700)
        box = page.evaluate(VIZ_LAYOUT_JS)["box"]
        if box is not None and box == last:
            break
        last = box
    dismiss_viz_popups(page)
    layout = fit_graph(page)
    page.screenshot(path=str(screenshot))
    return layout["tasks"], note


def _same_name(label: str) -> str:
    """kedro-viz can show "pretty" names (``Fit Lora Adapter Node``); compare loosely."""
    return label.strip().lower().replace("_", " ")


def check_viz(report: Report, context, base: str, pipelines: list[str], out: Path, timeout_ms: int) -> None:
    page = context.new_page()
    page.add_init_script(VIZ_INIT_SCRIPT)
    main = get_json(f"{base}/api/main")
    registered = {p["id"] for p in main.get("pipelines", [])}
    report.add("viz: pipelines registered", set(pipelines) <= registered,
               f"kedro-viz lists {sorted(registered)}; expected {pipelines}")

    # 1. every node of every pipeline in one picture (datasets hidden so the labels can be read)
    tasks = {n["name"]: n.get("pipelines", []) for n in main["nodes"] if n.get("type") == "task"}
    shot = out / "kedro_viz.png"
    drawn, note = render_viz(page, f"{base}/?pid=__default__&types=nodes", len(tasks), shot, timeout_ms)
    drawn_names = {_same_name(d) for d in drawn}
    missing = sorted(name for name in tasks if _same_name(name) not in drawn_names)
    per_pipeline = {pid: sum(pid in p for p in tasks.values()) for pid in pipelines}
    report.add("viz: all pipelines' nodes drawn", bool(tasks) and not missing and all(per_pipeline.values()),
               f"{len(tasks) - len(missing)} of {len(tasks)} task nodes drawn {note}"
               f"(per pipeline: {per_pipeline}){'; missing: ' + ', '.join(missing) if missing else ''} -> {shot}")

    # 2. each pipeline on its own, with its datasets
    for pid in pipelines:
        if pid not in registered:
            report.add(f"viz: {pid}", False, "not a registered pipeline")
            continue
        data = get_json(f"{base}/api/pipelines/{pid}")
        api_tasks = sorted(n["name"] for n in data["nodes"] if n.get("type") == "task")
        shot = out / f"kedro_viz_{pid}.png"
        drawn, note = render_viz(page, f"{base}/?pid={pid}&types=nodes,datasets", len(api_tasks), shot, timeout_ms)
        drawn_names = {_same_name(d) for d in drawn}
        missing = [name for name in api_tasks if _same_name(name) not in drawn_names]
        in_main = sorted(name for name, owners in tasks.items() if pid in owners)
        ok = bool(api_tasks) and not missing and in_main == api_tasks
        names = ", ".join(api_tasks[:4]) + (", ..." if len(api_tasks) > 4 else "")
        detail = (f"{len(api_tasks)} nodes in the API ({names or 'none: empty pipeline'}), "
                  f"{len(api_tasks) - len(missing)} drawn {note}-> {shot}")
        report.add(f"viz: {pid}", ok, detail + (f"; missing: {', '.join(missing)}" if missing else ""))
    page.close()


LAYERS = ["01_raw", "02_intermediate", "03_primary", "05_model_input", "06_models", "07_model_output",
          "08_reporting"]
PREVIEW_DATASET, PREVIEW_PIPELINE = "synthetic_preview_grid", "synthesis"


def check_viz_layers(report: Report, base: str) -> None:
    """Layers in order, every dataset in one, and no ``*_mlflow`` copies."""
    main = get_json(f"{base}/api/main")
    layers = main.get("layers") or []
    data = [n for n in main["nodes"] if n.get("type") == "data"]
    without = sorted(n["name"] for n in data if not n.get("layer"))
    copies = sorted(n["name"] for n in data if n["name"].endswith("_mlflow"))
    report.add("viz: layers", layers == LAYERS and not without,
               f"{' -> '.join(layers) or 'none'}; {len(data)} datasets"
               + (f"; without a layer: {', '.join(without)}" if without else ", each in a layer"))
    views = {}
    for pid in PIPELINES:  # the API lists every layer; a pipeline's view draws those of its datasets
        data = get_json(f"{base}/api/pipelines/{pid}")
        drawn = {n.get("layer") for n in data["nodes"] if n.get("type") == "data"}
        views[pid] = [x for x in data.get("layers") or [] if x in drawn]
    report.add("viz: each pipeline's layers in data-flow order",
               all(v and v == [x for x in LAYERS if x in v] for v in views.values()),
               "; ".join(f"{pid}: {' -> '.join(v) or 'none'}" for pid, v in views.items()))
    report.add("viz: no *_mlflow copies", not copies, f"{len(data)} datasets" + (f"; copies: {copies}" if copies else ""))


# the image sets and models of the catalog and the preview type kedro-viz must report for each
# (the return annotation of the dataset's preview(); "_empty" without one)
PREVIEW_TYPES = {
    "source_images": "ImagePreview", "target_images": "ImagePreview", "lora_subset": "ImagePreview",
    "prior_corpus": "ImagePreview", "synthetic_batch": "ImagePreview",
    "base_model": "ImagePreview", "lora_adapter": "ImagePreview", "lora_adapter_fits": "JSONPreview",
}
# (dataset, pipeline, screenshot): the side panels photographed
PREVIEW_SHOTS = (
    (PREVIEW_DATASET, PREVIEW_PIPELINE, "kedro_viz_preview"),
    ("synthetic_batch", "synthesis", "kedro_viz_preview_synthetic_batch"),
    ("base_model", "lora_training", "kedro_viz_preview_base_model"),
)


def check_viz_preview_types(report: Report, base: str) -> None:
    """kedro-viz's node API: every image set and model has a typed, non-empty preview."""
    main = get_json(f"{base}/api/main")
    ids = {n["name"]: n["id"] for n in main["nodes"] if n.get("type") == "data"}
    for pid in (p["id"] for p in main.get("pipelines", [])):  # e.g. prior_corpus: only in base_training
        ids.update({n["name"]: n["id"] for n in get_json(f"{base}/api/pipelines/{pid}")["nodes"]
                    if n.get("type") == "data" and n["name"] not in ids})
    found, bad = [], []
    for name, expected in PREVIEW_TYPES.items():
        if name not in ids:
            bad.append(f"{name}: not in any pipeline")
            continue
        meta = get_json(f"{base}/api/nodes/{ids[name]}", timeout=300)
        kind, preview = meta.get("preview_type"), meta.get("preview")
        root = Path(str(meta.get("filepath") or ""))
        saved = root.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir())
        # a saved version must be previewed; one never saved can only be typed
        (found if kind == expected and (preview or not saved) else bad).append(
            f"{name}: {kind}" + ("" if preview else " (no preview" + ("" if saved else ": never saved") + ")"))
    report.add("viz: image sets and models have typed previews", not bad,
               "; ".join(found + bad))


def check_viz_preview(report: Report, context, base: str, project: Path, out: Path, timeout_ms: int,
                      dataset: str = PREVIEW_DATASET, pipeline: str = PREVIEW_PIPELINE,
                      shot_name: str = "kedro_viz_preview") -> None:
    """``pipeline`` with ``dataset`` selected: its preview image in the side panel (and expanded)."""
    name = f"viz: {dataset} preview"
    data = get_json(f"{base}/api/pipelines/{pipeline}")
    node = next((n for n in data["nodes"] if n.get("name") == dataset), None)
    if node is None:
        report.add(name, False, f"{dataset} is not in the {pipeline} pipeline")
        return
    shot = out / f"{shot_name}.png"
    page = context.new_page()
    page.add_init_script(VIZ_INIT_SCRIPT)
    page.goto(f"{base}/?pid={pipeline}&types=nodes,datasets&sid={node['id']}",
              wait_until="domcontentloaded", timeout=timeout_ms)
    ok, detail = False, ""
    image = "img[src^='data:image']"  # kedro-viz draws an ImagePreview as a data-URI <img>
    try:
        img = page.locator(image).first
        img.wait_for(state="attached", timeout=timeout_ms)
        page.wait_for_function(f"() => {{ const el = document.querySelector(\"{image}\"); "
                               "return el && el.complete && el.naturalWidth > 0; }", timeout=30000)
        size = img.evaluate("el => [el.naturalWidth, el.naturalHeight]")
        ok, detail = size[0] > 100, f"preview image {size[0]}x{size[1]} px in the side panel"
    except Exception as exc:  # noqa: BLE001
        detail = (f"no preview image after {timeout_ms // 1000} s ({type(exc).__name__}); "
                  "has it a saved version (run the pipelines first)?")
    dismiss_viz_popups(page)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(shot))
    expanded = out / f"{shot_name}_expanded.png"
    try:  # the same preview, full size ("Expand preview")
        page.get_by_text("Expand preview").first.click(timeout=10000)
        page.wait_for_timeout(2000)
        page.screenshot(path=str(expanded))
        detail += f"; expanded -> {expanded}"
    except Exception as exc:  # noqa: BLE001 - the side panel shot is the check
        detail += f"; could not expand ({type(exc).__name__})"
    report.add(name, ok, f"{detail} -> {shot}")
    page.close()


def check_mlflow_datasets(report: Report, context, base: str, run: dict, out: Path, timeout_ms: int) -> None:
    """The run page's Datasets panel names the run's inputs."""
    url = f"{base}/#/experiments/{run['experiment_id']}/runs/{run['run_id']}?workflowType=machine_learning"
    shot = out / "mlflow_run_datasets.png"
    page = context.new_page()
    page.set_viewport_size(MLFLOW_VIEWPORT)
    page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
    try:
        page.get_by_text(run["datasets"][0], exact=False).first.wait_for(timeout=timeout_ms)
    except Exception:  # noqa: BLE001 - reported below
        pass
    _close_mlflow_assistant(page)
    try:  # the Datasets panel shows one dataset and "+N": open the list of all of them
        more = page.get_by_text(re.compile(r"^\+\d+$")).first
        if more.count():
            more.click(timeout=5000)
            page.wait_for_timeout(1000)
    except Exception:  # noqa: BLE001 - the names are checked below
        pass
    page.wait_for_timeout(1500)
    page.screenshot(path=str(shot))
    text = page.inner_text("body")
    shown = [d for d in run["datasets"] if d in text]
    report.add("mlflow: run page shows its input datasets", len(shown) == len(run["datasets"]),
               f"run {run['run_id']} ({run['name']}): {len(shown)} of {len(run['datasets'])} datasets shown "
               f"({', '.join(shown)}); synthetic batch made by run {run.get('upstream')} -> {shot}")
    page.close()


def _close_mlflow_assistant(page) -> None:
    try:  # MLflow 3's assistant side panel takes a third of the page
        close = page.get_by_role("button", name="Close")
        if close.count() and close.first.is_visible():
            close.first.click(timeout=3000)
            page.wait_for_timeout(500)
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def check_mlflow_compare(report: Report, context, base: str, pair: list[dict], out: Path, timeout_ms: int) -> None:
    """MLflow's compare view of two runs: what differs in their parameters, the headline metrics,
    and their common artifact ``summary.png`` (at the root of each run's artifacts) side by side."""
    ids = json.dumps([r["run_id"] for r in pair])
    exps = json.dumps(sorted({r["experiment_id"] for r in pair}))
    url = f"{base}/#/compare-runs?runs={ids}&experiments={exps}"
    differing = sorted(k for k in set(pair[0]["params"]) | set(pair[1]["params"])
                       if pair[0]["params"].get(k) != pair[1]["params"].get(k))
    shot = out / "mlflow_compare.png"
    page = context.new_page()
    page.set_viewport_size({"width": 1600, "height": 1500})
    page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
    try:
        page.get_by_text(HEADLINE[0], exact=False).first.wait_for(timeout=timeout_ms)
    except Exception:  # noqa: BLE001 - reported below
        pass
    _close_mlflow_assistant(page)
    page.wait_for_timeout(1500)
    try:  # parameters: only those that differ, then the metrics table in view
        page.get_by_text("Show diff only").first.click(timeout=5000)
        page.wait_for_timeout(1000)
        page.get_by_text("Metrics", exact=True).first.scroll_into_view_if_needed(timeout=5000)
        page.mouse.wheel(0, -250)  # keep the parameter differences in the picture
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
    page.wait_for_timeout(1500)
    text = page.inner_text("body")
    page.screenshot(path=str(shot))
    headline = sorted(k for k in pair[0]["metrics"] if "." not in k and "/" not in k)
    same_keys = set(pair[0]["metrics"]) == set(pair[1]["metrics"])
    shown = [k for k in headline if k in text]
    shown_params = [k for k in differing if k in text]
    # MLflow draws only the first rows of its metrics grid (alphabetical); the rest are in both runs
    below = [k for k in headline if k not in shown]
    report.add("mlflow: compare view of two runs",
               bool(shown_params) and HEADLINE[0] in text and same_keys and all(h in headline for h in HEADLINE),
               f"{pair[0]['name']!r} vs {pair[1]['name']!r} ({pair[0]['run_id'][:8]}, {pair[1]['run_id'][:8]}); "
               f"differing parameters on screen: {', '.join(shown_params[:4]) or 'none'} (of {len(differing)}); "
               f"same metric keys: {same_keys}; top-level metrics on screen: {', '.join(shown)}"
               + (f"; further down the grid (in both runs): {', '.join(below)}" if below else "") + f" -> {shot}")
    _compare_artifact(report, page, out)
    page.close()


def _compare_artifact(report: Report, page, out: Path, name: str = "summary.png") -> None:
    """The compare view's artifact section: ``name`` listed as common to both runs, and drawn."""
    shot = out / "mlflow_compare_summary.png"
    try:
        item = page.get_by_text(name, exact=True).first
        item.scroll_into_view_if_needed(timeout=15000)
        item.click(timeout=5000)
        page.wait_for_timeout(2500)
        item.scroll_into_view_if_needed(timeout=5000)
        page.mouse.wheel(0, 300)
        page.wait_for_timeout(1000)
    except Exception:  # noqa: BLE001 - reported below
        pass
    text = page.inner_text("body")
    big = "[...document.images].filter(i => i.complete && i.naturalWidth > 300).length"
    try:  # one image per run, side by side, once loaded
        page.wait_for_function(f"() => {big} >= 2", timeout=30000)
    except Exception:  # noqa: BLE001 - counted below
        pass
    images = page.evaluate(f"() => {big}")
    page.screenshot(path=str(shot))
    report.add("mlflow: compare view shows summary.png", name in text and "No common artifacts" not in text
               and images >= 2, f"{name} listed: {name in text}; drawn for {images} runs -> {shot}")


def check_mlflow_runs_list(report: Report, context, base: str, runs: dict, out: Path, timeout_ms: int) -> None:
    """The experiment as a new user opens it, and as the README says: MLflow 3.17 opens a fresh
    browser in its GenAI view whatever the experiment's ``mlflow.experimentKind`` tag says (the
    sidebar's GenAI / Model training switch decides, kept per browser); one click on "Model
    training" shows the runs table, its runs told apart by name."""
    url = f"{base}/#/experiments/{runs['experiment_id']}"
    shot = out / "mlflow_runs.png"
    page = context.new_page()
    page.set_viewport_size({"width": 1600, "height": 900})
    page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
    page.wait_for_timeout(4000)
    first = "GenAI overview" if "Traces" in page.inner_text("body") and not any(
        n in page.inner_text("body") for n in runs["names"]) else "runs table"
    how = "clicking 'Model training'"
    try:
        page.get_by_text("Model training", exact=True).first.click(timeout=10000, force=True)
        page.get_by_text(runs["names"][0], exact=False).first.wait_for(timeout=30000)
    except Exception:  # noqa: BLE001 - the README's direct link instead
        how = "the README's link (?workflowType=machine_learning)"
        page.goto(f"{url}/runs?workflowType=machine_learning", wait_until="domcontentloaded", timeout=timeout_ms)
        try:
            page.get_by_text(runs["names"][0], exact=False).first.wait_for(timeout=min(timeout_ms, 120000))
        except Exception:  # noqa: BLE001 - reported below
            pass
    _close_mlflow_assistant(page)
    page.wait_for_timeout(2000)
    text = page.inner_text("body")
    page.screenshot(path=str(shot))
    shown = [n for n in runs["names"] if n in text]
    report.add("mlflow: the experiment's runs, told apart by name",
               runs["kind"] == "custom_model_development" and len(shown) >= 2 and len(set(shown)) == len(shown),
               f"a fresh browser opened the {first}; after {how}: {len(shown)} of the latest "
               f"{len(runs['names'])} run names in the table, all different: {shown[:4]}; experiment tag "
               f"mlflow.experimentKind={runs['kind']} -> {shot}")
    # the experiment's shared view "headline" (fu_kedro.mlflow_ui): the same table, headline metrics as columns
    shot = out / "mlflow_runs_headline.png"
    headline_url = f"{url}/runs?viewStateShareKey=headline&workflowType=machine_learning"
    page.goto(headline_url, wait_until="domcontentloaded", timeout=timeout_ms)
    try:
        page.get_by_text(HEADLINE[0], exact=False).first.wait_for(timeout=60000)
    except Exception:  # noqa: BLE001 - reported below
        pass
    _close_mlflow_assistant(page)
    page.wait_for_timeout(2000)
    text = page.inner_text("body")
    # MLflow sorts the metric columns by name and draws only those in view: with many arms
    # 'fidelity' sits to the right of the window; scroll the grid sideways until it shows
    for _ in range(12):
        if HEADLINE[0] in text:
            break
        page.evaluate("""() => document.querySelectorAll('.ag-center-cols-viewport, .ag-body-horizontal-scroll-viewport,'
                         + ' .ag-body-viewport').forEach(e => { e.scrollLeft += 600; })""")
        page.wait_for_timeout(800)
        text = page.inner_text("body")
    page.screenshot(path=str(shot))
    report.add("mlflow: the headline view shows the headline metrics as columns",
               HEADLINE[0] in text and any(n in text for n in runs["names"]),
               f"{headline_url}: '{HEADLINE[0]}' column {'shown' if HEADLINE[0] in text else 'missing'} -> {shot}")
    page.close()


# --------------------------------------------------------------------------- the report
REPORT_WIDTH = 1400


def latest_report(project: Path) -> Path | None:
    root = project / "data" / "08_reporting" / "evaluation_report.html"
    versions = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    return versions[-1] / "evaluation_report.html" if versions else None


def check_report(report: Report, context, project: Path, out: Path) -> None:
    """The latest evaluation report in a 1,400 px window: no sideways scrolling of the page, and
    its lineage section read from the run's own records (no "no lineage record")."""
    path = latest_report(project)
    if path is None or not path.is_file():
        report.add("report: fits a 1,400 px window", False, f"no saved evaluation_report under {project / 'data'}")
        return
    shot = out / "report_top.png"
    page = context.new_page()
    page.set_viewport_size({"width": REPORT_WIDTH, "height": 1000})
    page.set_content(path.read_text(), wait_until="load")  # self-contained: no request leaves the page
    page.wait_for_timeout(1000)
    width = page.evaluate("() => document.documentElement.scrollWidth")
    page.screenshot(path=str(shot))
    report.add("report: fits a 1,400 px window", width <= REPORT_WIDTH,
               f"{path.parent.name}: page {width} px wide in a {REPORT_WIDTH} px window -> {shot}")
    lineage = page.evaluate("() => { const s = document.querySelector('section.lineage'); return s ? s.innerText : ''; }")
    report.add("report: lineage read from this run", bool(lineage) and "no lineage record" not in lineage,
               f"{lineage.count(chr(10)) + 1 if lineage else 0} lines; 'no lineage record' "
               f"{'absent' if 'no lineage record' not in lineage else 'present'}")
    page.close()


def check_mlflow_page(report: Report, context, base: str, run: dict, out: Path, timeout_ms: int) -> None:
    # workflowType=machine_learning: the "Model training" view of MLflow 3 (Runs, not GenAI's Evaluations)
    url = f"{base}/#/experiments/{run['experiment_id']}/runs/{run['run_id']}?workflowType=machine_learning"
    names = sorted(run["metrics"])
    shot = out / "mlflow_run.png"
    page = context.new_page()
    page.set_viewport_size(MLFLOW_VIEWPORT)
    page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
    try:
        page.get_by_text(ZERO_SHOT, exact=False).first.wait_for(timeout=timeout_ms)
    except Exception as exc:  # noqa: BLE001
        page.screenshot(path=str(shot))
        report.add("mlflow: run page shows zero-shot metrics", False,
                   f"{url}: no '{ZERO_SHOT}' text after {timeout_ms // 1000} s ({type(exc).__name__}) -> {shot}")
        return
    _close_mlflow_assistant(page)
    search = page.get_by_placeholder("Search metrics")
    if search.count():
        search.first.fill(ZERO_SHOT)
        page.wait_for_timeout(1000)
    try:
        page.get_by_text(names[-1], exact=True).first.scroll_into_view_if_needed(timeout=5000)
    except Exception:  # noqa: BLE001
        pass
    page.wait_for_timeout(1000)
    page.screenshot(path=str(shot))
    text = page.inner_text("body")
    shown = [n for n in names if n in text]
    values = sum(1 for n in shown if repr(float(run["metrics"][n])) in text)
    # all of them; a paper-profile run logs 100+, of which the table may draw only a part
    report.add("mlflow: run page shows zero-shot metrics", len(shown) >= min(len(names), 10),
               f"run {run['run_id']} ({run['name']}): {len(shown)} of {len(names)} zero-shot metric names "
               f"on the page, {values} with their logged value, e.g. {shown[:2] or names[:2]} -> {shot}")
    page.close()


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, default=PROJECT_ROOT, help="Kedro project root (default: this repo)")
    ap.add_argument("--out", type=Path, default=None, help="screenshot folder (default: <project>/docs/journey)")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow store to browse (default: server.mlflow_tracking_uri of the project's conf)")
    ap.add_argument("--env", default=None, help="Kedro config environment (default: Kedro's, i.e. local)")
    ap.add_argument("--pipelines", default=",".join(PIPELINES),
                    help=f"pipelines that must have nodes in kedro-viz (default: {','.join(PIPELINES)})")
    ap.add_argument("--timeout", type=float, default=600,
                    help="seconds to wait for each server / page (default 600; kedro-viz imports the whole project)")
    ap.add_argument("--no-install", action="store_true", help="do not install chromium/playwright when missing")
    return ap.parse_args(argv)


def _raise_keyboard_interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    project = args.project.resolve()
    out = (args.out or project / "docs" / "journey").resolve()
    out.mkdir(parents=True, exist_ok=True)
    pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    timeout_ms = int(args.timeout * 1000)
    # a SIGTERM (e.g. pytest-timeout, CI) must still run the finally blocks that stop the servers
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)

    try:
        chromium = ensure_chromium(install=not args.no_install)
        sync_playwright = ensure_playwright(install=not args.no_install)
    except BrowserUnavailable as exc:
        print(f"JOURNEY-NO-BROWSER: {exc}", flush=True)
        return EXIT_NO_BROWSER
    log(f"browser: {chromium}")

    tracking_uri = (absolute_uri(args.tracking_uri, Path.cwd()) if args.tracking_uri
                    else project_tracking_uri(project, args.env))
    log(f"MLflow store: {tracking_uri}")
    run, why = find_zero_shot_run(tracking_uri)
    if run:
        log(f"latest run with zero-shot metrics: {run['run_id']} ({run['name']}, {len(run['metrics'])} metrics)")

    dataset_run, dataset_why = find_dataset_run(tracking_uri)
    pair, pair_why = find_compare_pair(tracking_uri)
    runs_list, runs_why = find_runs_list(tracking_uri)

    report = Report()
    if not run:
        report.add("mlflow: a run has zero-shot metrics", False, why)
    else:
        report.add("mlflow: a run has zero-shot metrics", True,
                   f"{run['run_id']} ({run['name']}): {len(run['metrics'])} metrics, e.g. {sorted(run['metrics'])[0]}")

    log_dir = Path(tempfile.mkdtemp(prefix="journey-logs-"))
    servers: list[Server] = []
    try:
        with ExitStack() as stack:
            stack.callback(lambda: [s.stop() for s in reversed(servers)])
            viz_port = free_port()
            viz = Server("kedro-viz", [sys.executable, "-m", "kedro", "viz", "run", "--no-browser",
                                       "--host", "127.0.0.1", "--port", str(viz_port)]
                         + (["--env", args.env] if args.env else []), project, log_dir)
            servers.append(viz)
            mlflow_base = None
            if run and tracking_uri.startswith(("http://", "https://")):
                mlflow_base = tracking_uri.rstrip("/")  # an existing tracking server: just open it
            elif run:
                ml_port, artifacts = free_port(), artifact_root_for(tracking_uri, project)
                ml = Server("mlflow-ui", [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
                                          "--default-artifact-root", artifacts.as_uri(),
                                          "--artifacts-destination", str(artifacts),
                                          "--host", "127.0.0.1", "--port", str(ml_port), "--workers", "1"],
                            project, log_dir)
                servers.append(ml)
                ok, why = ml.wait_http(f"http://127.0.0.1:{ml_port}/health", args.timeout)
                if report.add("mlflow: ui answers", ok, f"http://127.0.0.1:{ml_port}/health {why}".strip()):
                    mlflow_base = f"http://127.0.0.1:{ml_port}"
            viz_base = f"http://127.0.0.1:{viz_port}"
            viz_ok, why = viz.wait_http(f"{viz_base}/api/main", args.timeout)
            report.add("viz: server answers", viz_ok, f"{viz_base}/api/main {why}".strip())

            if not viz_ok and not mlflow_base:
                return EXIT_FAILED
            with sync_playwright() as pw:
                try:
                    browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                                 args=["--disable-dev-shm-usage", "--disable-gpu"])
                except Exception as exc:  # noqa: BLE001
                    print(f"JOURNEY-NO-BROWSER: {chromium} does not start: {exc}", flush=True)
                    return EXIT_NO_BROWSER
                try:
                    context = browser.new_context(viewport=VIZ_VIEWPORT)
                    local_requests_only(context, installed_version("kedro-viz"),
                                        (urlparse(mlflow_base).hostname,) if mlflow_base else ())
                    if viz_ok:
                        for name, check in (
                            ("viz: graph check", lambda: check_viz(report, context, viz_base, pipelines, out,
                                                                   timeout_ms)),
                            ("viz: layers", lambda: check_viz_layers(report, viz_base)),
                            ("viz: image sets and models have typed previews",
                             lambda: check_viz_preview_types(report, viz_base)),
                            *((f"viz: {d} preview", lambda d=d, p=p, n=n: check_viz_preview(
                                report, context, viz_base, project, out, timeout_ms, d, p, n))
                              for d, p, n in PREVIEW_SHOTS),
                        ):
                            try:
                                check()
                            except Exception as exc:  # noqa: BLE001
                                report.add(name, False, f"{type(exc).__name__}: {exc}")
                    if mlflow_base and run:
                        try:
                            check_mlflow_page(report, context, mlflow_base, run, out, timeout_ms)
                        except Exception as exc:  # noqa: BLE001
                            report.add("mlflow: run page shows zero-shot metrics", False,
                                       f"{type(exc).__name__}: {exc}")
                    if mlflow_base:
                        for name, item, why_not, check in (
                            ("mlflow: run page shows its input datasets", dataset_run, dataset_why,
                             check_mlflow_datasets),
                            ("mlflow: compare view of two runs", pair, pair_why, check_mlflow_compare),
                            ("mlflow: the experiment's runs, told apart by name", runs_list, runs_why,
                             check_mlflow_runs_list),
                        ):
                            if not item:
                                report.add(name, False, why_not)
                                continue
                            try:
                                check(report, context, mlflow_base, item, out, timeout_ms)
                            except Exception as exc:  # noqa: BLE001
                                report.add(name, False, f"{type(exc).__name__}: {exc}")
                    try:
                        check_report(report, context, project, out)
                    except Exception as exc:  # noqa: BLE001
                        report.add("report: fits a 1,400 px window", False, f"{type(exc).__name__}: {exc}")
                finally:
                    browser.close()
    except KeyboardInterrupt as exc:
        report.add("journey: interrupted", False, str(exc))
    finally:
        print(report.summary(), flush=True)
        if not report.ok:
            print(f"server logs: {log_dir}", flush=True)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)
    return EXIT_OK if report.ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
