"""Lineage records: which catalog versions (and raw files) every saved output was made from.

While a run goes, :class:`fu_kedro.tracking.LineageHooks` writes one record per saved
version of a versioned catalog entry, as ``lineage.json`` beside the data::

    data/08_reporting/zero_shot_metrics.json/<version>/zero_shot_metrics.json
    data/08_reporting/zero_shot_metrics.json/<version>/lineage.json

and puts the same record (without the output's own hash) inside the outputs that can hold
it, under ``made_from``: JSON dicts (``zero_shot_metrics.json``, ``synthetic_quality.json``,
...), image sets (``info.json``, e.g. beside the synthetic manifest) and the LoRA adapter's
safetensors metadata.

A record (``schema: fu_kedro.lineage/1``)::

    dataset, version, path (project-relative when inside the project), sha256 (sidecar only),
    node, run {session_id, env, pipelines, mlflow_run_id, mlflow_run_name, mlflow_experiment_id,
               lineage_mismatch [{text, versions {dataset: version}}] when the run went on with
               inputs that do not belong together (prerequisites.on_lineage_mismatch: warn)},
    params  {name: value}          the node's parameters
    inputs  [entry, ...]           as resolved at load time, one per node input:
        kind "versioned": dataset, version, path, sha256, mlflow_run_id (of the run that saved it)
        kind "in_run":    dataset (in memory or not versioned), made in this run by ``node``
                          from its own ``inputs`` / ``params`` (nested)
        kind "file":      dataset, path (not versioned, not made in this run)
        kind "raw":       domain, format, path, n_files, digest, files [{path, size, sha256}]
    upstream [...]                 every versioned ancestor and raw source, flattened

Nothing here needs a Kedro session: the chain is followed from file to file, so
``kedro lineage`` and :func:`chain_html` work on any copy of ``data/``.
"""
from __future__ import annotations

import hashlib
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

SCHEMA = "fu_kedro.lineage/1"
SIDECAR = "lineage.json"
EMBED_KEY = "made_from"
# Content hashes are computed up to this many bytes per output or raw folder ("where cheap").
HASH_LIMIT_BYTES = 4 * 1024**3
_IGNORED = {"__MACOSX", "Thumbs.db", ".DS_Store"}


# --------------------------------------------------------------------------- hashing
def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def list_files(root: Path) -> list[Path]:
    """Regular files under ``root`` (itself if a file), sorted, hidden files and folders left out."""
    if root.is_file():
        return [root]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _IGNORED)
        files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".") and f not in _IGNORED
                  and os.path.isfile(os.path.join(dirpath, f))]  # not a broken or looping link (the readers name those)
    return files


def content_hash(path: Path, limit: int = HASH_LIMIT_BYTES, skip: Iterable[str] = (SIDECAR,)) -> str | None:
    """sha256 of a file, or of a folder (over the sorted ``relative path, file sha256`` lines);
    None when missing or bigger than ``limit`` bytes."""
    path = Path(path)
    if not path.exists():
        return None
    if path.is_file():
        return sha256_file(path) if path.stat().st_size <= limit else None
    files = [f for f in list_files(path) if f.name not in set(skip)]
    if sum(f.stat().st_size for f in files) > limit:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return digest.hexdigest()


def raw_files_entry(domain: str, fmt: str | None, path: str | None, extra: dict | None = None,
                    limit: int = HASH_LIMIT_BYTES) -> dict[str, Any]:
    """The raw input of an ingestion read: every file under ``path`` with its size and sha256,
    and one digest over all of them. Phantom data have no files (``generated: true``)."""
    entry: dict[str, Any] = {"kind": "raw", "dataset": f"raw {domain} data", "domain": domain, "format": fmt}
    if extra:
        entry.update(extra)
    if not path:
        entry.update(generated=True, path=None, n_files=0, digest=None, files=[])
        return entry
    root = Path(path).expanduser().resolve()
    files = list_files(root) if root.exists() else []
    total = sum(f.stat().st_size for f in files)
    listed = []
    for f in files:
        listed.append({"path": f.relative_to(root).as_posix() if f != root else f.name, "size": f.stat().st_size,
                       "sha256": sha256_file(f) if total <= limit else None})
    # surrogateescape: a file name that is not UTF-8 hashes as its bytes (the readers name it as bad input)
    text = "".join(f"{x['path']}\0{x['sha256']}\n" for x in listed)
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()
    entry.update(path=root.as_posix(), n_files=len(listed), bytes=total,
                 digest=digest if total <= limit else None, files=listed)
    return entry


# --------------------------------------------------------------------------- records on disk
def sidecar_path(version_path: Path) -> Path:
    """``<filepath>/<version>/lineage.json`` for the saved ``<filepath>/<version>/<name>``."""
    return Path(version_path).parent / SIDECAR


def to_jsonable(obj: Any, finite: bool = False) -> Any:
    """Plain JSON values, the project's one sanitiser: string keys, lists for tuples and sets,
    numpy (and 0-d torch) scalars as Python numbers, anything else as its ``str``.
    ``finite``: NaN and ±inf become ``null``, so the file is standard JSON (metrics files)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, finite) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v, finite) for v in obj]
    if not isinstance(obj, (str, int, float, bool)) and obj is not None and callable(getattr(obj, "item", None)):
        try:
            obj = obj.item()  # numpy scalars
        except (TypeError, ValueError):
            return str(obj)
    if isinstance(obj, float) and finite and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def write_sidecar(version_path: Path, record: dict) -> Path:
    path = sidecar_path(version_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(to_jsonable(record), indent=2))
    os.replace(tmp, path)
    return path


def read_sidecar(version_path: Path) -> dict | None:
    path = sidecar_path(version_path)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def rel_path(path: Path | str, project: Path | None) -> str:
    """``path`` relative to the project when inside it (records stay valid when it moves)."""
    p = Path(path)
    if project is not None:
        try:
            return p.resolve().relative_to(Path(project).resolve()).as_posix()
        except ValueError:
            pass
    return p.as_posix()


def abs_path(path: str | None, project: Path | None) -> Path | None:
    if not path:
        return None
    p = Path(path)
    return p if p.is_absolute() or project is None else Path(project) / p


def flatten_upstream(inputs: list[dict], project: Path | None, cache: dict[str, dict] | None = None) -> list[dict]:
    """Every versioned ancestor and raw source of ``inputs``, once each, nearest first.

    ``cache``: records by absolute path, for versions of the running run (not published yet)."""
    seen: set[tuple] = set()
    out: list[dict] = []

    def add(item: dict) -> None:
        key = (item.get("kind"), item.get("dataset"), item.get("version"), item.get("path"), item.get("digest"))
        if key not in seen:
            seen.add(key)
            out.append(item)

    def walk(entries: list[dict]) -> None:
        for e in entries:
            kind = e.get("kind")
            if kind == "versioned":
                add({k: e.get(k) for k in ("kind", "dataset", "version", "path", "sha256", "mlflow_run_id", "node")})
                path = abs_path(e.get("path"), project) if e.get("path") else None
                record = ((cache or {}).get(str(path.resolve())) if path else None) or (read_sidecar(path) if path else None)
                for up in (record or {}).get("upstream", []):
                    add(up)
            elif kind == "in_run":
                walk(e.get("inputs", []))
            elif kind == "raw":
                add({k: e.get(k) for k in ("kind", "dataset", "domain", "format", "path", "n_files", "digest",
                                            "generated", "seed")})
            elif kind == "file":
                add({k: e.get(k) for k in ("kind", "dataset", "path")})

    walk(inputs)
    return out


# --------------------------------------------------------------------------- the chain as a tree
@dataclass
class Step:
    """One node of the printed chain: a dataset version (or raw source) and where it came from."""

    label: str
    detail: str = ""
    children: list["Step"] = field(default_factory=list)
    repeated: bool = False
    params: dict = field(default_factory=dict)  # the parameters the node that made it read
    mixes: list[dict] = field(default_factory=list)  # run.lineage_mismatch of the record (mark_mixed)


PARAM_LINE = 150  # characters of one printed parameter line (longer ones wrap)


def params_text(params: dict, shown: set | None = None) -> str:
    """``seed=42, lora_training.lora.rank=8, ...``: every leaf of a node's parameters (long lists
    counted); with ``shown`` (the ``key=value`` printed so far in a tree), only the new ones."""
    def leaves(value: Any, key: str):
        if isinstance(value, dict) and value:
            for k, v in value.items():
                yield from leaves(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, (list, tuple)) and len(value) > 6:
            yield f"{key}=[{len(value)} items]"
        else:
            text = json.dumps(value, default=str) if isinstance(value, (list, tuple, dict)) else str(value)
            yield f"{key}={text if len(text) <= 60 else text[:57] + '...'}"

    items = list(leaves(params or {}, ""))
    if shown is None:
        return ", ".join(items)
    new = [i for i in items if i not in shown]
    shown.update(items)
    same = len(items) - len(new)
    return ", ".join(new) + (f" (+{same} as above)" if new and same else "" if new else f"as above ({same} keys)")


def _run_text(run: dict | None, names: dict[str, str]) -> str:
    """``MLflow run <id> (<name>)``; the name only the first time a run is printed."""
    if not run or not run.get("mlflow_run_id"):
        return "no MLflow run recorded"
    rid = run["mlflow_run_id"]
    shown = names.setdefault("__shown__", {})
    if rid in shown:
        return f"MLflow run {rid}"
    shown[rid] = True
    name = names.get(rid) or run.get("mlflow_run_name") or ""
    return f"MLflow run {rid}" + (f" ({name})" if name else "")


def _entry_step(entry: dict, project: Path | None, seen: set, names: dict[str, str], run: dict | None) -> Step:
    kind = entry.get("kind")
    if kind == "raw":
        if entry.get("generated"):
            return Step(f"raw {entry.get('domain')} data: {entry.get('format')} (generated, no files)",
                        f"seed {entry.get('seed')}" if entry.get("seed") is not None else "")
        files = entry.get("files") or []
        shown = ", ".join(f"{f['path']} sha256:{(f.get('sha256') or '?')[:12]}" for f in files[:3])
        more = f", ... ({len(files) - 3} more)" if len(files) > 3 else ""
        return Step(f"raw {entry.get('domain')} data: {entry.get('format')} {entry.get('path')}",
                    f"{entry.get('n_files')} files, digest sha256:{(entry.get('digest') or '?')[:16]}; {shown}{more}")
    if kind == "in_run":
        where = f"not versioned, {entry['path']}" if entry.get("path") else "in memory"
        label = f"{entry['dataset']} ({where})"
        key = ("in_run", entry["dataset"], (run or {}).get("mlflow_run_id"))
        if key in seen:
            return Step(label, "(shown above)", repeated=True)
        seen.add(key)
        step = Step(label, f"{entry.get('node')}, {_run_text(run, names)}", params=entry.get("params") or {})
        step.children = [_entry_step(e, project, seen, names, run) for e in entry.get("inputs", [])]
        return step
    if kind == "file":
        return Step(f"{entry['dataset']} (not versioned) {entry.get('path')}")
    # versioned
    return version_step(entry["dataset"], entry.get("version"), abs_path(entry.get("path"), project), project,
                        seen, names, fallback=entry)


MIXED = "MIXED INPUT"  # the mark of an input that did not belong with the others of its run


def mark_mixed(root: Step) -> Step:
    """Mark the inputs that a run went on with although they did not belong together
    (``run.lineage_mismatch`` of a record: prerequisites.on_lineage_mismatch was ``warn``):
    each such input in the tree below that record is marked, and the record's step says why
    (once per mix, at the highest step that has it)."""
    noted: set[str] = set()

    def mark(s: Step, labels: set[str]) -> None:
        if s.label in labels:
            s.label += f"  <- {MIXED}"
        for child in s.children:
            mark(child, labels)

    def walk(s: Step) -> None:
        for child in s.children:
            walk(child)
        if s.mixes:
            mark(s, {f"{d}@{v}" for m in s.mixes for d, v in (m.get("versions") or {}).items()})

    def note(s: Step) -> None:
        text = "; ".join(str(m.get("text")) for m in s.mixes)
        if s.mixes and text not in noted:
            noted.add(text)
            s.children.insert(0, Step(f"{MIXED}S: made from inputs that do not belong together "
                                      f"(prerequisites.on_lineage_mismatch: warn): {text}"))
        for child in s.children:
            note(child)

    walk(root)
    note(root)
    return root


def version_step(dataset: str, version: str | None, path: Path | None, project: Path | None,
                 seen: set | None = None, names: dict[str, str] | None = None, fallback: dict | None = None) -> Step:
    """The chain below one saved version, read from its ``lineage.json`` and its inputs' ones."""
    seen = set() if seen is None else seen
    names = {} if names is None else names
    label = f"{dataset}@{version}"
    record = read_sidecar(path) if path else None
    if record is None and path is not None and version:  # saved earlier in the run that is reading it
        from fu_kedro.datasets.staging import staged_paths

        record = next((r for r in map(read_sidecar, staged_paths(path, version)) if r), None)
    if (dataset, version) in seen:
        return Step(label, "(shown above)", repeated=True)
    seen.add((dataset, version))
    if record is None:
        sha = (fallback or {}).get("sha256")
        rid = (fallback or {}).get("mlflow_run_id")
        return Step(label, "no lineage record (saved before lineage was recorded)"
                    + (f"; sha256:{sha[:16]}" if sha else "") + (f"; MLflow run {rid}" if rid else ""))
    run = record.get("run") or {}
    sha = record.get("sha256")
    detail = f"{record.get('node')}, {_run_text(run, names)}" + (f", sha256:{sha[:16]}" if sha else "")
    step = Step(label, detail, params=record.get("params") or {})
    step.children = [_entry_step(e, project, seen, names, run) for e in record.get("inputs", [])]
    step.mixes = run.get("lineage_mismatch") or []
    return step


def render_text(step: Step, prefix: str = "", last: bool = True, root: bool = True,
                shown: set | None = None) -> list[str]:
    """The tree as text lines; each node's parameters under it, a ``key=value`` printed once per tree."""
    shown = set() if shown is None else shown
    lines = [step.label + (f"  [{step.detail}]" if step.detail else "")] if root else [
        prefix + ("└── " if last else "├── ") + step.label + (f"  [{step.detail}]" if step.detail else "")]
    child_prefix = "" if root else prefix + ("    " if last else "│   ")
    if step.params:  # under the label, beside the tree's line down to the children
        import textwrap

        lead = child_prefix + ("│ " if step.children else "  ")
        lines += [lead + ("params: " if i == 0 else "        ") + part for i, part in
                  enumerate(textwrap.wrap(params_text(step.params, shown), PARAM_LINE, break_on_hyphens=False))]
    for i, child in enumerate(step.children):
        lines += render_text(child, child_prefix, i == len(step.children) - 1, root=False, shown=shown)
    return lines


def _render_html(step: Step) -> str:
    label = html.escape(step.label)
    detail = f' <span class="lineage-detail">{html.escape(step.detail)}</span>' if step.detail else ""
    if step.params:
        detail += f'<br><span class="lineage-detail">params: {html.escape(params_text(step.params))}</span>'

    children = "".join(f"<li>{_render_html(c)}</li>" for c in step.children)
    return f"<code>{label}</code>{detail}" + (f"<ul>{children}</ul>" if children else "")


def record_step(record: dict, project: Path | None = None, names: dict[str, str] | None = None) -> Step:
    """The chain of an embedded ``made_from`` record (e.g. ``zero_shot_metrics["made_from"]``)."""
    names = {} if names is None else names
    dataset, version = record.get("dataset", "?"), record.get("version")
    run = record.get("run") or {}
    step = Step(f"{dataset}@{version}", f"{record.get('node')}, {_run_text(run, names)}",
                params=record.get("params") or {})
    seen = {(dataset, version)}
    step.children = [_entry_step(e, project, seen, names, run) for e in record.get("inputs", [])]
    step.mixes = run.get("lineage_mismatch") or []
    return step


def chain_html(made_from: dict | None, project: Path | str | None = None, heading: bool = True) -> str:
    """An HTML section with the version chain of an output, for the evaluation report.

    ``made_from`` is the record the lineage hook put into a saved output (e.g. the
    ``zero_shot_metrics`` dict a node loads has it under ``"made_from"``); pass the dict
    itself or the output holding it. Relative paths are read against ``project`` (default:
    the working directory, i.e. the project root under ``kedro run``). ``heading=False``
    leaves out the ``<h2>`` (for a report that titles its sections itself).
    """
    if made_from and EMBED_KEY in made_from:
        made_from = made_from[EMBED_KEY]
    title = "<h2>Lineage: versions this result was made from</h2>" if heading else ""
    if not made_from:
        return title + "<p>No lineage record (this output was not saved through a Kedro run with the lineage hook).</p>"
    project = Path(project) if project else Path.cwd()
    tree = mark_mixed(record_step(made_from, project))
    note = ("<p>Each line is a catalog version (<code>dataset@version</code>) with the node and the MLflow run "
            "that made it, down to the raw files. The same tree: <code>kedro lineage "
            f"{html.escape(str(made_from.get('dataset')))}@{html.escape(str(made_from.get('version')))}</code>.</p>")
    style = ("<style>.lineage ul{list-style:none;margin:0 0 0 1.1em;padding-left:.8em;border-left:1px solid #bbb}"
             ".lineage-detail{color:#666;font-size:.85em}</style>")
    return f'{style}<section class="lineage">{title}{note}<ul><li>{_render_html(tree)}</li></ul></section>'
