"""Readers of the raw source folders (the only file I/O of the ingestion, see docs/ingestion.md).

Each ``scan_*`` function turns a folder into a *manifest* (one row per image to read:
``file, image_id, patient_id, plane, label, center, machine`` + extras) and records bad
rows/files in an ``IssueLog``; :func:`load_manifest` then opens, checks and preprocesses
every listed image. :func:`read_domain` is the entry point the ingestion node calls.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from fu_kedro.datasets import ImageSet

from .phantom import CLASSES, generate_phantoms
from .preprocess import preprocess_image
from .validation import IMAGE_SUFFIXES, BadImage, BadInputError, IssueLog, open_grayscale

logger = logging.getLogger(__name__)

FORMATS = ("phantom", "fetal_planes_db", "african", "folders")
FPDB_CSV = "FETAL_PLANES_DB_data.csv"
FPDB_COLUMNS = ["Image_name", "Patient_num", "Plane", "Brain_plane", "Operator", "US_Machine", "Train"]
AFRICAN_COLUMNS = ["Patient_num", "Plane", "Train", "Center", "Image_name"]
META_COLUMNS = ["image_id", "patient_id", "label", "domain", "center", "machine", "source_file"]


def _is_listable(p: Path) -> bool:
    # hidden files (.DS_Store, ._foo.png from macOS) are OS litter, not data
    return p.is_file() and not p.name.startswith(".") and p.name != "Thumbs.db"


def _read_csv(path: Path, sep: str, required: list[str]) -> pd.DataFrame:
    try:
        # utf-8-sig: a CSV saved by Excel starts with a BOM that would glue onto the first column name
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except Exception as exc:  # noqa: BLE001 - any parser failure means the same to the user
        raise BadInputError(f"{path}: cannot be parsed as a {sep!r}-separated CSV: {exc}") from exc
    # the FETAL_PLANES_DB header has 'Train ' with a trailing space; match on stripped names
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        hint = ""
        if len(df.columns) == 1 and any(s in df.columns[0] for s in ",;\t"):
            hint = f" (the header is one column {df.columns[0]!r}: wrong separator? expected {sep!r})"
        raise BadInputError(f"{path}: missing column(s) {missing}; found {list(df.columns)}{hint}")
    return df.apply(lambda col: col.str.strip())


def plane_to_label(plane: str, plane_labels: dict[str, str]) -> str | None:
    """Map a plane name (``Fetal abdomen``, ``abdomen``, ``Other`` ...) to a class, or None."""
    key = plane.strip().lower()
    table = {k.strip().lower(): v for k, v in plane_labels.items()}
    table.update({c: c for c in CLASSES})
    return table.get(key)


def _label_rows(df: pd.DataFrame, plane_col: str, file_col: str, cfg: dict, log: IssueLog) -> pd.DataFrame:
    """Add ``label``; drop excluded planes (counted), quarantine unknown ones."""
    excluded = {p.strip().lower() for p in cfg.get("exclude_planes") or []}
    is_excl = df[plane_col].str.lower().isin(excluded)
    if is_excl.any():
        logger.info("%s: %d image(s) of excluded planes %s left out (ingestion.exclude_planes)",
                    log.domain, int(is_excl.sum()), sorted(df.loc[is_excl, plane_col].unique()))
    df = df[~is_excl].copy()
    df["label"] = [plane_to_label(p, cfg["plane_labels"]) for p in df[plane_col]]
    for _, row in df[df["label"].isna()].iterrows():
        log.add(row[file_col], f"unknown plane label {row[plane_col]!r} (not in ingestion.plane_labels)")
    return df[df["label"].notna()]


def _quarantine_duplicates(df: pd.DataFrame, log: IssueLog, where: str) -> pd.DataFrame:
    # Which of the rows is right cannot be told, so every row of a duplicated name goes.
    counts = df["image_id"].value_counts()
    dup = df["image_id"].map(counts) > 1
    for _, row in df[dup].iterrows():
        log.add(row["file"], f"duplicate image name {row['image_id']!r} ({counts[row['image_id']]} times in {where})")
    return df[~dup]


def _quarantine_unlisted(folder: Path, listed: set[str], log: IssueLog, ignore: set[Path] = frozenset()) -> None:
    for p in sorted(folder.iterdir()):
        if not _is_listable(p) or p in ignore:
            continue
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            log.add(p, f"not an image file ({p.suffix or 'no extension'}) in the image folder")
        elif str(p) not in listed:
            log.add(p, "image file present but not listed in the CSV")


def _check_missing(df: pd.DataFrame, csv: Path, log: IssueLog) -> pd.DataFrame:
    exists = df["file"].map(lambda f: Path(f).is_file())
    for f in df.loc[~exists, "file"]:
        log.add(f, f"listed in {csv.name} but missing")
    return df[exists]


def scan_fetal_planes_db(path: Path, cfg: dict, log: IssueLog) -> pd.DataFrame:
    """Zenodo FETAL_PLANES_DB: ``FETAL_PLANES_DB_data.csv`` (';') + ``Images/<Image_name>.png``."""
    csv = path / FPDB_CSV
    if not csv.is_file():
        raise BadInputError(f"{csv}: not found (fetal_planes_db layout needs {FPDB_CSV} and Images/)")
    images = path / "Images"
    if not images.is_dir():
        raise BadInputError(f"{images}: folder not found (fetal_planes_db layout)")
    df = _read_csv(csv, ";", FPDB_COLUMNS)
    names = df["Image_name"].str.replace(r"\.png$", "", regex=True)
    df = df.assign(image_id=names, file=[str(images / f"{n}.png") for n in names])
    listed = set(df["file"])
    df = _label_rows(df, "Plane", "file", cfg, log)
    df = _quarantine_duplicates(df, log, csv.name)
    df = _check_missing(df, csv, log)
    _quarantine_unlisted(images, listed, log)
    return pd.DataFrame({
        "file": df["file"], "image_id": df["image_id"], "patient_id": df["Patient_num"],
        "plane": df["Plane"], "label": df["label"], "center": "fetal_planes_db",
        "machine": df["US_Machine"], "operator": df["Operator"], "brain_plane": df["Brain_plane"],
        "db_train": df["Train"],
    }).reset_index(drop=True)


def scan_african(path: Path, cfg: dict, log: IssueLog) -> pd.DataFrame:
    """African fetal planes: one CSV (any name, ',') + the PNGs beside it."""
    csvs = sorted(p for p in path.glob("*.csv") if _is_listable(p))
    if len(csvs) != 1:
        raise BadInputError(f"{path}: african layout needs exactly one CSV beside the PNGs, found {[c.name for c in csvs]}")
    csv = csvs[0]
    df = _read_csv(csv, ",", AFRICAN_COLUMNS)
    names = df["Image_name"].str.replace(r"\.png$", "", regex=True)
    # patient numbers restart in every center (patient002 exists in Egypt and Malawi)
    df = df.assign(image_id=names, file=[str(path / f"{n}.png") for n in names],
                   patient_id=df["Center"] + "_" + df["Patient_num"])
    listed = set(df["file"])
    df = _label_rows(df, "Plane", "file", cfg, log)
    df = _quarantine_duplicates(df, log, csv.name)
    df = _check_missing(df, csv, log)
    _quarantine_unlisted(path, listed, log, ignore={csv})
    return pd.DataFrame({
        "file": df["file"], "image_id": df["image_id"], "patient_id": df["patient_id"],
        "plane": df["Plane"], "label": df["label"], "center": df["Center"], "machine": "unknown",
        "db_train": df["Train"],
    }).reset_index(drop=True)


def scan_folders(path: Path, cfg: dict, log: IssueLog) -> pd.DataFrame:
    """One sub-folder per class (``brain/``, ``Fetal brain/`` ...); no patient ids, so each image is its own patient."""
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise BadInputError(f"{path}: folders layout needs one sub-folder of images per class, found none")
    excluded = {p.strip().lower() for p in cfg.get("exclude_planes") or []}
    rows = []
    for p in sorted(q for q in path.iterdir() if _is_listable(q)):
        log.add(p, "file outside any class folder")
    for d in subdirs:
        if d.name.strip().lower() in excluded:
            logger.info("%s: folder %s left out (ingestion.exclude_planes)", log.domain, d)
            continue
        label = plane_to_label(d.name, cfg["plane_labels"])
        files = sorted(p for p in d.rglob("*") if _is_listable(p))
        if label is None:
            for f in files or [d]:
                log.add(f, f"unknown plane label {d.name!r} (class folder name not in ingestion.plane_labels)")
            continue
        images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
        for f in files:
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                log.add(f, f"not an image file ({f.suffix or 'no extension'})")
        if not images:
            log.add(d, "empty class folder: no images")
        for f in images:
            stem = "_".join(f.relative_to(d).with_suffix("").parts)
            rows.append({"file": str(f), "image_id": f"{label}__{stem}", "plane": d.name, "label": label,
                         "center": path.name, "machine": "unknown"})
    df = pd.DataFrame(rows, columns=["file", "image_id", "plane", "label", "center", "machine"])
    df = _quarantine_duplicates(df, log, f"folder {path}")
    df["patient_id"] = df["image_id"]
    return df.reset_index(drop=True)


SCANNERS = {"fetal_planes_db": scan_fetal_planes_db, "african": scan_african, "folders": scan_folders}


def load_manifest(manifest: pd.DataFrame, domain: str, cfg: dict, log: IssueLog) -> ImageSet:
    """Open, check and preprocess every image of ``manifest``; bad ones go to ``log``."""
    size = int(cfg["image_size"])
    images, keep = [], []
    for i, f in enumerate(tqdm(manifest["file"], desc=f"ingestion: reading {domain} images", leave=False)):
        try:
            gray = open_grayscale(Path(f), cfg["limits"], log)
            images.append(preprocess_image(gray, size, cfg["preprocess"]))
            keep.append(i)
        except (BadImage, ValueError) as exc:
            log.add(f, str(exc))
    meta = manifest.iloc[keep].rename(columns={"file": "source_file"}).reset_index(drop=True)
    meta["domain"] = domain
    extra = [c for c in meta.columns if c not in META_COLUMNS]
    arr = np.stack(images) if images else np.zeros((0, size, size), np.uint8)
    return ImageSet(arr, meta[META_COLUMNS + extra], {})


def _check_required_classes(images: ImageSet, where: str, required: list[str], log: IssueLog) -> None:
    present = set(images.meta["label"])
    for c in required:
        if c not in present:
            log.add(where, f"empty class: no usable {c!r} images (ingestion.required_classes)")


def read_domain(fmt: str, path: str | None, domain: str, seed: int, cfg: dict) -> tuple[ImageSet, pd.DataFrame]:
    """Read one domain in format ``fmt`` from ``path``; apply ``cfg['on_bad_input']``.

    Returns the preprocessed ``ImageSet`` (meta columns ``META_COLUMNS`` + format extras)
    and the quarantine rows (``file, reason, domain``). ``info['counts']`` holds read/kept/skipped.
    """
    if fmt not in FORMATS:
        raise BadInputError(f"{domain}_format={fmt!r} is not one of {FORMATS}")
    log = IssueLog(domain)
    if fmt == "phantom":
        ph = cfg["phantom"][domain]
        images = generate_phantoms(domain, int(ph["n_per_class"]), int(cfg["image_size"]), int(seed),
                                   settings=ph.get("settings"),
                                   images_per_patient=tuple(ph.get("images_per_patient", (3, 6))))
    else:
        if not path:
            raise BadInputError(f"{domain}_format={fmt} needs {domain}_path (a folder); got {path!r}")
        root = Path(path).expanduser().resolve()
        if not root.is_dir():
            raise BadInputError(f"{root}: {domain}_path is not a folder")
        manifest = SCANNERS[fmt](root, cfg, log)
        images = load_manifest(manifest, domain, cfg, log)
        _check_required_classes(images, str(root), list(cfg["required_classes"][domain] or []), log)
    log.enforce(cfg["on_bad_input"])
    report = log.frame()
    # every examined item ends up either kept or as one quarantine row
    n_listed = len(images) + len(report)
    images.info.update({"format": fmt, "path": None if fmt == "phantom" else str(root), "domain": domain,
                        "seed": int(seed), "image_size": int(cfg["image_size"]),
                        "conversions": dict(log.conversions),
                        "counts": {"read": int(n_listed), "kept": len(images), "skipped": len(report)}})
    logger.info("%s (%s): read %d, kept %d, skipped %d; per class %s", domain, fmt, n_listed, len(images),
                len(report), images.meta["label"].value_counts().sort_index().to_dict())
    return images, report
