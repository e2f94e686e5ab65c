"""Run atomicity: a run's versioned outputs become visible all at once when the run ends well.

During a ``kedro run`` every versioned output of the run (any ``AbstractVersionedDataset``
of the catalog: our image sets and models, kedro-datasets' CSV/JSON/PNG/HTML) is written to a
staging folder beside its real place::

    <parent>/.staging/<save_version>-<host>-<pid>/<name>/<save_version>/<name>

Nodes of the same run load from there (a node reads what an earlier node of the run saved).
Kedro finds the latest version of a dataset by globbing ``<parent>/<name>/*/<name>``, which
never matches a staging folder, so nothing staged is "latest" for anyone else.

- The run ends well (``after_pipeline_run``): each staged version folder is renamed into
  ``<parent>/<name>/<save_version>`` (one ``os.replace`` per dataset, same file system), then
  the staging folder is removed.
- The run raises (``on_pipeline_error``): the staging folders are deleted.
- The run is killed (SIGKILL, power cut): the staging folders stay, invisible; the next run
  removes those whose process (host + pid in the folder name) is gone.

What this does not cover: a crash *during* the publishing renames (milliseconds at the very
end of a run) can leave some of that run's outputs published and others not; the upstream
check in ``fu_kedro.prerequisites`` names outputs of different runs if a later run reads such a mix.
Non-versioned outputs (the MLflow artifact copies, the synthesis shard store, which has its
own atomic writes) are written in place as before.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kedro.io.core import AbstractVersionedDataset

log = logging.getLogger(__name__)

STAGING = ".staging"
_TAG = re.compile(r"^(?P<version>.+)-(?P<host>[^-]+)-(?P<pid>\d+)$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


@dataclass
class StagedDataset:
    name: str
    final: Path  # <parent>/<name>: the dataset's real versioned folder
    staged: Path  # <parent>/.staging/<tag>/<name>
    version: str

    @property
    def tag_dir(self) -> Path:
        return self.staged.parent


def stage(name: str, dataset, save_version: str | None = None) -> StagedDataset | None:
    """Point a versioned local dataset's writes (and this run's loads) at its staging folder.

    Returns None (and changes nothing) for datasets that are not versioned local files.
    """
    if not isinstance(dataset, AbstractVersionedDataset) or not getattr(dataset, "_version", None):
        return None
    if getattr(dataset, "_protocol", "file") not in ("file", "local", None):
        return None  # remote stores: left as they are
    version = save_version or dataset.resolve_save_version()
    final = PurePosixPath(dataset._filepath)  # noqa: SLF001 - AbstractVersionedDataset's path
    tag = f"{version}-{_host()}-{os.getpid()}"
    staged = final.parent / STAGING / tag / final.name
    dataset._filepath = staged  # noqa: SLF001 - _get_versioned_path builds every path from it
    clear = getattr(dataset, "_clear_version_cache", None)
    if clear:
        clear()  # a load version looked up before staging would point at the old folder
        dataset._cached_save_version = version  # noqa: SLF001 - keep the run's one save version
    return StagedDataset(name, Path(final), Path(staged), version)


def unstage(record: StagedDataset, dataset) -> None:
    """Point the dataset back at its real folder (after publishing or discarding)."""
    dataset._filepath = PurePosixPath(record.final.as_posix())  # noqa: SLF001


def publish(records: list[StagedDataset]) -> list[str]:
    """Move every staged version into place; returns the names published."""
    done = []
    for r in records:
        src = r.staged / r.version
        if not src.exists():
            continue  # the dataset was not saved in this run (e.g. a node that did not run)
        dst = r.final / r.version
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        done.append(r.name)
    for tag_dir in {r.tag_dir for r in records}:
        shutil.rmtree(tag_dir, ignore_errors=True)
        _remove_if_empty(tag_dir.parent)
    return done


def discard(records: list[StagedDataset]) -> None:
    """Delete what a failed run staged."""
    for tag_dir in {r.tag_dir for r in records}:
        shutil.rmtree(tag_dir, ignore_errors=True)
        _remove_if_empty(tag_dir.parent)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_abandoned(parents: set[Path]) -> list[Path]:
    """Delete staging folders of runs whose process is gone (killed runs) on this host."""
    removed = []
    for parent in sorted(parents):
        root = parent / STAGING
        if not root.is_dir():
            continue
        for tag_dir in sorted(root.iterdir()):
            m = _TAG.match(tag_dir.name)
            if not m or m["host"] != _host() or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
                continue
            shutil.rmtree(tag_dir, ignore_errors=True)
            removed.append(tag_dir)
        _remove_if_empty(root)
    return removed


def published_path(path: str | Path) -> Path:
    """The place a staged path will have once its run is published (identity for other paths)."""
    p = Path(path)
    parts = p.parts
    if STAGING not in parts:
        return p
    i = len(parts) - 1 - parts[::-1].index(STAGING)
    if i + 1 >= len(parts):
        return p
    return Path(*parts[:i], *parts[i + 2:])


def staged_paths(path: str | Path, version: str) -> list[Path]:
    """Where a published path ``<parent>/<name>/<version>/<file>`` is while the run saving it is
    still going (``<parent>/.staging/<version>-<host>-<pid>/<name>/<version>/<file>``): a report
    made in the same run reads its inputs' lineage there."""
    p = Path(path)
    if len(p.parts) < 3 or p.parent.name != version:
        return []
    root = p.parent.parent
    return sorted((root.parent / STAGING).glob(f"{glob.escape(version)}-*/{glob.escape(root.name)}/"
                                               f"{glob.escape(version)}/{glob.escape(p.name)}"))
