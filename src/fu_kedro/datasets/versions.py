"""Versions of Kedro's versioned datasets: what a run loads, what was saved, and where it is.

Kedro's public API answers most of it (``resolve_load_version``, ``list_versions``); the
folder of a version that is not saved yet (this run's save version) and a dataset's root
folder have none, so :func:`versioned_path` and :func:`versioned_root` read Kedro's own
``_get_versioned_path`` / ``_filepath`` — the one place outside ``staging`` (which moves that
root) that does.
"""
from __future__ import annotations

from pathlib import Path

from kedro.io.core import AbstractVersionedDataset


def load_version(dataset) -> str | None:
    """The version a load reads (pinned by ``--load-versions``, else the latest saved); None when
    the dataset is not versioned or nothing is saved."""
    try:  # duck-typed: kedro-mlflow's artifact wrappers are versioned datasets too
        return dataset.resolve_load_version()
    except Exception:  # noqa: BLE001 - not a versioned dataset, or nothing saved
        return None


def save_version(dataset) -> str | None:
    """The version this run saves the dataset under (None when not versioned)."""
    try:
        return dataset.resolve_save_version()
    except Exception:  # noqa: BLE001 - not a versioned dataset
        return None


def saved_versions(dataset) -> list[str]:
    """The saved versions of a versioned dataset, oldest first (empty if none or not versioned)."""
    if not isinstance(dataset, AbstractVersionedDataset):
        return []
    try:
        return sorted(dataset.list_versions(full_path=False))
    except Exception:  # noqa: BLE001 - no version folder yet
        return []


def versioned_path(dataset, version: str | None) -> Path | None:
    """``<filepath>/<version>/<name>`` of a versioned dataset (None if not versioned)."""
    if version is None or not hasattr(dataset, "_get_versioned_path"):
        return None
    try:
        return Path(str(dataset._get_versioned_path(version)))  # noqa: SLF001 - no public API for it
    except Exception:  # noqa: BLE001
        return None


def versioned_root(dataset) -> Path | None:
    """``<filepath>``, the folder holding every version of a versioned dataset (None if not versioned)."""
    if not isinstance(dataset, AbstractVersionedDataset) or getattr(dataset, "_version", None) is None:
        return None  # resolve_load/save_version would fetch or mint a version to tell; _version just says
    return Path(str(dataset._filepath))  # noqa: SLF001 - no public API for it
