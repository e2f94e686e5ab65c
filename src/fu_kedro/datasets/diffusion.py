"""Versioned Kedro datasets for the diffusion base model and the LoRA adapter.

``DiffusionModelDataset`` stores the base model a run used::

    <filepath>/<version>/<name>/
        reference.json     kind (tiny | pretrained), model id/path, content hash, description
        model/             the trained weights (``save_pretrained``) — tiny base only

For the ``tiny`` base trained here the weights themselves are the artifact (a later run can
reuse them by loading this catalog version). For a ``pretrained`` base (SD v1.5, gigabytes)
only the reference is written — the id/path and a content hash of the weights that were
used — and loading reads the weights from that path again (the hash is checked). Loading
reads ``reference.json`` at once and the weights on the first use of ``BaseModel.pipe``: a
node that needs only the info (the adapter's lineage record) does not load them.

``LoraAdapterDataset`` stores the adapter as one safetensors file in diffusers' LoRA key
format (``StableDiffusionPipeline.load_lora_weights(<file>)`` loads it) with its lineage
(rank, alpha, base hash, LoRA subset ids, parameters) in the file's metadata header.

``LoraAdapterFitsDataset`` stores the independent LoRA fits 1..K-1 of ``lora_training.lora.fits``
(fit 0 is ``lora_adapter``) as one folder: ``fit-01.safetensors`` ... (each like the adapter
file above) and ``fits.json`` (K, the fit-0 adapter they belong to, a summary per fit). With
K = 1 the folder holds ``fits.json`` alone.

Two read-only entries name files that come from outside the project, their path a parameter
(``${params:...}`` in the catalog, :class:`fu_kedro.config.ProjectConfigLoader`):

``PretrainedBaseDataset`` is the pretrained base (SD v1.5, a diffusers folder or a hub id in the
local Hugging Face cache; ``lora_training.base_model.pretrained_path``): a ``BaseModel`` whose
weights are read on the first use of ``pipe`` (never to describe it).

``LoraAdapterFileDataset`` is a LoRA file to use as it is (diffusers or kohya-ss format;
``lora_training.adapter_file``): an :class:`~fu_kedro.models.lora.ImportedAdapter`, the file read
and hashed on first use. Both load ``None`` when the parameter is null (the default: nothing is read).

The three writable ones write under a temporary name and rename at the end, so a failed run never leaves a
file or folder that looks complete. Loaded objects carry the catalog version they came from
(``BaseModel.info["catalog_version"]`` / ``metadata["catalog_version"]``) so later steps can
record it (the synthesis manifest does).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
from kedro.io.core import (
    AbstractDataset,
    AbstractVersionedDataset,
    DatasetError,
    Version,
    VersionNotFoundError,
    get_filepath_str,
    get_protocol_and_path,
)
from kedro_datasets._typing import ImagePreview, JSONPreview

from fu_kedro.models.base_model import BaseModel
from fu_kedro.lineage import sha256_file
from fu_kedro.models.diffusion import load_pretrained_pipeline, pipeline_hash, to_json
from fu_kedro.models.lora import (
    ImportedAdapter,
    LoraAdapter,
    LoraAdapterFits,
    read_adapter_file,
    save_adapter_file,
)
from fu_kedro.models.pretrained import resolve_pretrained_base

from .staging import published_path


FITS_INDEX = "fits.json"


def _version_of(path: Path) -> str | None:
    """The Kedro version folder a versioned path sits in (``.../<version>/<name>``)."""
    return path.parent.name if path.parent.name.count(".") >= 3 else None


class _LocalVersioned(AbstractVersionedDataset):
    def __init__(self, filepath: str, version: Version | None = None, metadata: dict | None = None):
        protocol, path = get_protocol_and_path(filepath)
        if protocol != "file":
            raise DatasetError(f"{type(self).__name__} writes to the local file system only")
        self._protocol = protocol
        self._fs = fsspec.filesystem(protocol)
        self.metadata = metadata
        super().__init__(
            filepath=PurePosixPath(path), version=version, exists_function=self._fs.exists, glob_function=self._fs.glob
        )

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version}

    def _load_path(self) -> Path:
        return Path(get_filepath_str(self._get_load_path(), self._protocol))

    def _save_path(self) -> Path:
        path = Path(get_filepath_str(self._get_save_path(), self._protocol))
        if path.exists():
            raise DatasetError(f"{path} exists already; a versioned artifact is never overwritten")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _exists(self) -> bool:
        try:
            return self._fs.exists(str(self._load_path()))
        except DatasetError:
            return False



def _load_pipe(folder: Path, reference: dict[str, Any]):
    """The weights of a saved base: the tiny base's ``model/`` folder, or the pretrained base
    from its path again (its content hash checked against the reference)."""
    from diffusers import StableDiffusionPipeline

    if reference["kind"] == "pretrained":
        pipe = load_pretrained_pipeline(reference["model"])
        found = pipeline_hash(pipe)
        if reference.get("content_hash") and found != reference["content_hash"]:
            raise DatasetError(
                f"{reference['model']}: weights changed since this reference was written "
                f"(hash {found}, recorded {reference['content_hash']} in {folder / 'reference.json'})"
            )
    else:
        pipe = StableDiffusionPipeline.from_pretrained(folder / "model", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class DiffusionModelDataset(_LocalVersioned):
    """A :class:`~fu_kedro.models.base_model.BaseModel` (pipeline + reference; see module docstring).

    The ``info`` of the model to save needs at least ``kind``; for ``pretrained`` also
    ``model``, the id/path it was loaded from (as ``lora_training`` sets them).
    """

    def load(self) -> BaseModel:
        """The reference now; the weights on the first use of ``BaseModel.pipe`` (``_load_pipe``)."""
        folder = self._load_path()
        ref_file = folder / "reference.json"
        if not ref_file.is_file():
            raise DatasetError(f"{folder}: no reference.json (not a base-model artifact, or an incomplete one)")
        reference = json.loads(ref_file.read_text())
        return BaseModel(info=reference | {"catalog_version": _version_of(folder)},
                         load=partial(_load_pipe, folder, reference))

    def preview(self, steps: int = 20, guidance_scale: float = 5.0, seed: int = 0,
                caption_template: str = "a photo of fetal {plane}") -> ImagePreview:
        """kedro-viz: the saved version's configuration and one sample per class (tiny base:
        generated from its weights with fixed seeds; a pretrained base is not loaded)."""
        from fu_kedro.datasets.previews import base_model_card

        folder = self._load_path()
        reference = json.loads((folder / "reference.json").read_text())
        return base_model_card(folder, partial(_load_pipe, folder, reference), steps, guidance_scale, seed,
                               caption_template)

    def save(self, data: BaseModel) -> None:
        reference = dict(data.info)
        if "kind" not in reference:
            raise DatasetError("DiffusionModelDataset.save: the base model's info has no 'kind' (tiny | pretrained)")
        reference.setdefault("content_hash", pipeline_hash(data.pipe))
        reference.pop("catalog_version", None)
        folder = self._save_path()
        tmp = folder.parent / f".{folder.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
            if reference["kind"] != "pretrained":
                data.pipe.save_pretrained(tmp / "model", safe_serialization=True)
            (tmp / "reference.json").write_text(to_json(reference))
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


class LoraAdapterDataset(_LocalVersioned):
    """A :class:`~fu_kedro.models.lora.LoraAdapter` as one diffusers-format safetensors file."""

    def load(self) -> LoraAdapter:
        path = self._load_path()
        adapter = read_adapter_file(path)
        adapter.metadata["catalog_version"] = _version_of(path)
        adapter.metadata["file"] = str(path)  # the file read (staging, inside the run that saved it)
        if published_path(path) != path:
            adapter.metadata["published_file"] = str(published_path(path))  # where it is once the run ends
        return adapter

    def preview(self, base_filepath: str | None = None, steps: int = 20, guidance_scale: float = 5.0,
                seed: int = 0) -> ImagePreview:
        """kedro-viz: the saved adapter's configuration and one sample per class from the base it
        was trained on (``base_filepath``: the base model's catalog folder) with the adapter."""
        from fu_kedro.datasets.previews import adapter_card

        return adapter_card(self._load_path(), base_filepath, steps, guidance_scale, seed)

    def save(self, data: LoraAdapter) -> None:
        path = self._save_path()
        tmp = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            save_adapter_file(data, tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _read_fit(path: Path, version: str | None) -> LoraAdapter:
    adapter = read_adapter_file(path)
    adapter.metadata["catalog_version"] = version
    adapter.metadata["file"] = str(path)
    if published_path(path) != path:
        adapter.metadata["published_file"] = str(published_path(path))
    return adapter


class LoraAdapterFitsDataset(_LocalVersioned):
    """:class:`~fu_kedro.models.lora.LoraAdapterFits`: LoRA fits 1..K-1 as ``fit-NN.safetensors`` + ``fits.json``.

    Loading reads ``fits.json`` at once and each adapter on first use. With no saved version at
    all it loads an empty set that says so (``missing``): a run that does not use the fits
    (``synthesis.adapter_per_replicate: false``) does not need them.
    """

    def load(self) -> LoraAdapterFits:
        try:
            folder = self._load_path()
        except VersionNotFoundError as exc:
            return LoraAdapterFits([], {"fits": 1}, missing=str(exc))
        index = folder / FITS_INDEX
        if not index.is_file():
            raise DatasetError(f"{folder}: no {FITS_INDEX} (not a LoRA-fits artifact, or an incomplete one)")
        info = json.loads(index.read_text())
        version = _version_of(folder)
        files = [folder / f"fit-{r:02d}.safetensors" for r in range(1, int(info["fits"]))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise DatasetError(f"{folder}: {FITS_INDEX} lists {info['fits']} fits but {absent} are missing")
        return LoraAdapterFits([partial(_read_fit, f, version) for f in files], info | {"catalog_version": version})

    def preview(self) -> JSONPreview:
        """kedro-viz: ``fits.json`` of the saved version (K and a summary per fit)."""
        from fu_kedro.datasets.previews import json_preview

        return json_preview(json.loads((self._load_path() / FITS_INDEX).read_text()), drop=("made_from",))

    def save(self, data: LoraAdapterFits) -> None:
        folder = self._save_path()
        tmp = folder.parent / f".{folder.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
            for r in range(1, data.fits):
                save_adapter_file(data.adapter(r), tmp / f"fit-{r:02d}.safetensors")
            info = {k: v for k, v in data.info.items() if k != "catalog_version"} | {"fits": data.fits}
            (tmp / FITS_INDEX).write_text(to_json(info))
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


class _ParameterFile(AbstractDataset):
    """A read-only file (or folder) outside the project whose path is a parameter; None = not set.

    The path is kept as the parameter gives it (relative = to the working directory, as the
    pre-run check reads it) and recorded so. Its catalog key is not ``filepath``/``path``:
    Kedro would make those absolute, and rewrite a hub id ``owner/name`` into a folder.
    """

    what = "file"
    key = "file"

    def __init__(self, path: str | None = None, metadata: dict | None = None):
        self._filepath = str(path) if path not in (None, "") else None  # _filepath: what tracking records
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {self.key: self._filepath}

    def load(self) -> Any:
        return None if self._filepath is None else self._open(self._filepath)

    def _open(self, path: str) -> Any:  # the loaded object, its heavy part read on first use
        raise NotImplementedError

    def preview(self) -> JSONPreview:
        """kedro-viz: the parameter's path, and whether it is there (nothing is read)."""
        from fu_kedro.datasets.previews import json_preview

        found = self._filepath is not None and self._exists()
        return json_preview({self.key: self._filepath, "set": self._filepath is not None, "found": found})

    def save(self, data: Any) -> None:
        raise DatasetError(f"{type(self).__name__} is read-only: the {self.what} comes from outside the project")


class PretrainedBaseDataset(_ParameterFile):
    """The pretrained base (see module docstring): ``BaseModel`` with ``info`` kind/name/model at
    once and the weights (:func:`~fu_kedro.models.diffusion.load_pretrained_pipeline`: local only,
    a missing base names what to download) on the first use of ``pipe``; ``None`` when no path is set."""

    what = "pretrained base"
    key = "model"

    def __init__(self, model: str | None = None, metadata: dict | None = None):
        super().__init__(model, metadata)

    def _open(self, path: str) -> BaseModel:
        info = {"kind": "pretrained", "name": path, "model": path}
        lineage = read_base_lineage(path)
        if lineage is not None:  # a base made by base_training (e.g. the shipped models/tiny-phantom-sd)
            info |= {"name": f"{lineage.get('name') or path} ({path}; trained by base_training, not Stable Diffusion)",
                     "trained_by": {k: v for k, v in lineage.items() if k not in ("parameters", "architecture")},
                     "time_capped": lineage.get("time_capped") or {}}
        return BaseModel(info=info, load=partial(load_pretrained_pipeline, path))

    def _exists(self) -> bool:
        return self._filepath is not None and resolve_pretrained_base(self._filepath).problem is None


BASE_LINEAGE = "base_lineage.json"


def read_base_lineage(path: str | Path) -> dict[str, Any] | None:
    """The ``base_lineage.json`` of a base folder made by ``base_training``; ``None`` for any other folder (SD v1.5)."""
    file = Path(path).expanduser() / BASE_LINEAGE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except ValueError as exc:
        raise DatasetError(f"{file}: not readable JSON ({exc})") from exc


def _git(*args: str) -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def made_by() -> dict[str, Any]:
    """The command line and the git commit (and whether tracked files differed from it) of this process."""
    import shlex
    import sys
    import time

    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else []
    if argv and argv[0] in ("python -m kedro", "__main__.py"):  # `python -m kedro run ...`: the same command
        argv[0] = "kedro"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"command": shlex.join(argv), "commit": _git("rev-parse", "HEAD"),
            "tracked_files_modified": None if status is None else bool(status),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


class TrainedBaseDataset(PretrainedBaseDataset):
    """``base_training``'s output: a ``BaseModel`` written as a diffusers folder (``save_pretrained``:
    ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``;
    safetensors) with ``base_lineage.json`` (the model's ``info`` + the command, commit and save
    time, and the SHA-256 of every weights file). Loads like :class:`PretrainedBaseDataset`.

    Not versioned: the folder is the path a later ``lora_training`` reads (``pretrained_path``).
    A new base is written beside it and swapped in at the end (a failed save leaves the old one).
    """

    what = "base model folder"

    def save(self, data: BaseModel) -> None:
        if self._filepath is None:
            raise DatasetError("trained_base: base_training.output_path is not set")
        folder = Path(self._filepath).expanduser()
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{folder.name}.partial-{uuid.uuid4().hex[:8]}"
        old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
        try:
            data.pipe.save_pretrained(tmp, safe_serialization=True)
            weights = {str(f.relative_to(tmp)): sha256_file(f) for f in sorted(tmp.rglob("*.safetensors"))}
            record = dict(data.info) | {"made_by": made_by(), "weights_sha256": weights}
            (tmp / BASE_LINEAGE).write_text(to_json(record) + "\n")
            if folder.exists():
                os.replace(folder, old)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not folder.exists():
                os.replace(old, folder)
            raise
        shutil.rmtree(old, ignore_errors=True)


def _read_imported(path: str) -> tuple[LoraAdapter, str]:
    return read_adapter_file(path), sha256_file(Path(path))


class LoraAdapterFileDataset(_ParameterFile):
    """A LoRA file to use as it is (see module docstring): an ``ImportedAdapter`` (path at once;
    adapter and SHA-256 on first use; a missing or unreadable file is named then); ``None``
    when no path is set."""

    what = "LoRA adapter file"
    key = "file"

    def __init__(self, file: str | None = None, metadata: dict | None = None):
        super().__init__(file, metadata)

    def _open(self, path: str) -> ImportedAdapter:
        return ImportedAdapter(path, partial(_read_imported, path))

    def _exists(self) -> bool:
        return self._filepath is not None and Path(self._filepath).expanduser().is_file()
