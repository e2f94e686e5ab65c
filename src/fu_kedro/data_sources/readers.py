"""Readers of the raw source folders (the only file I/O of the ingestion, see docs/ingestion.md).

Each ``scan_*`` function turns a folder into a *manifest* (one row per image to read:
``file, image_id, patient_id, plane, label, center, machine`` + extras) and records bad
rows/files in an ``IssueLog``; :func:`load_manifest` then opens, checks and preprocesses
every listed image. :func:`read_domain` is the entry point the ingestion node calls.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from fu_kedro.datasets import ImageSet

from .phantom import CLASSES, generate_phantoms
from .preprocess import preprocess_image
from .validation import (
    IMAGE_SUFFIXES,
    NOT_UTF8,
    BadImage,
    BadInputError,
    IssueLog,
    check_policy,
    file_problem,
    is_utf8_name,
    open_grayscale,
    shown_path,
)

logger = logging.getLogger(__name__)

FORMATS = ("phantom", "fetal_planes_db", "african", "folders")
FPDB_CSV = "FETAL_PLANES_DB_data.csv"
FPDB_COLUMNS = ["Image_name", "Patient_num", "Plane", "Brain_plane", "Operator", "US_Machine", "Train"]
AFRICAN_COLUMNS = ["Patient_num", "Plane", "Train", "Center", "Image_name"]
META_COLUMNS = ["image_id", "patient_id", "label", "domain", "center", "machine", "source_file"]


HIDDEN_NAMES = ("__macosx", "thumbs.db", "desktop.ini")


def is_hidden(name: str) -> bool:
    """OS litter, ignored in every layout: ``.*`` (``.DS_Store``, ``._x.png``, ``.thumbnails/``),
    ``__MACOSX/``, ``Thumbs.db``, ``desktop.ini``."""
    return name.startswith(".") or name.lower() in HIDDEN_NAMES


def _is_listable(p: Path) -> bool:
    return p.is_file() and not is_hidden(p.name)


# The layout each folder format needs (``{root}``: the folder named by ``<domain>_path``).
LAYOUTS = {
    "fetal_planes_db": f"{{root}}/{FPDB_CSV} and {{root}}/Images/*.png",
    "african": "exactly one CSV (Patient_num,Plane,Train,Center,Image_name) with the PNGs beside it, all directly in {root}",
    "folders": "{root}/<class>/<images>",
}


def _csv_files(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*.csv") if _is_listable(p))


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(p.name))


def layout_problem(fmt: str, root: Path) -> str | None:
    """What ``root`` lacks for the layout of ``fmt`` (None when it has it, or needs no folder).

    The one layout check: the scanners below raise it, and the pre-run check
    (:mod:`fu_kedro.prerequisites`) reports it before any node runs.
    """
    if fmt not in LAYOUTS:
        return None
    if not root.is_dir():
        return f"{root} does not exist"
    if fmt == "fetal_planes_db":
        if not (root / FPDB_CSV).is_file():
            return f"{root} has no {FPDB_CSV}"
        if not (root / "Images").is_dir():
            return f"{root} has no Images/ folder"
    elif fmt == "african":
        csvs = _csv_files(root)
        if len(csvs) != 1:
            return f"{root} holds {len(csvs)} CSV files, not exactly one {[c.name for c in csvs]}"
        if not any(root.glob("*.png")):
            return f"{root} holds no PNG images"
    elif not _class_folders(root):
        return f"{root} has no class sub-folders"
    return None


def _require_layout(fmt: str, root: Path) -> None:
    problem = layout_problem(fmt, root)
    if problem:
        raise BadInputError(f"{problem}: the {fmt} layout needs {LAYOUTS[fmt].format(root=root)}")


def _folder_entries(folder: Path, log: IssueLog) -> list[os.DirEntry] | None:
    """The entries of ``folder`` (sorted by name), or None after logging why it cannot be listed."""
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except PermissionError:
        log.add(folder, "folder cannot be read: permission denied (its images cannot be listed)", folder=True)
    except OSError as exc:
        log.add(folder, f"folder cannot be read: {exc.strerror or exc}", folder=True)
    return None


def _visible_files(folder: Path, log: IssueLog) -> list[Path]:
    """Every readable file under ``folder`` (recursively; hidden names skipped). Nothing else is
    dropped silently: a name that is not UTF-8, a broken or looping symbolic link, a folder named
    like an image, a symbolic link to a folder (not followed) or an unreadable folder is logged
    with its reason."""
    entries = _folder_entries(folder, log)
    out: list[Path] = []
    for e in entries or []:
        p = Path(e.path)
        if is_hidden(e.name):
            continue
        is_dir = os.path.isdir(p)  # follows links; False for a broken or looping one
        named_like_image = p.suffix.lower() in IMAGE_SUFFIXES
        if not is_utf8_name(e.name):
            log.add(p, NOT_UTF8, folder=is_dir)
        elif is_dir and not named_like_image and not e.is_symlink():
            out += _visible_files(p, log)
        elif is_dir and not named_like_image:
            log.add(p, f"symbolic link to a folder ({shown_path(os.readlink(p))}): not followed, not read", folder=True)
        elif problem := file_problem(p):
            log.add(p, problem, folder=is_dir)
        else:
            out.append(p)
    return out


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
    if df.empty:
        raise BadInputError(f"{path}: no data rows (only the header): nothing to read")
    df = df.apply(lambda col: col.str.strip())
    # the line of each row in the file (header = line 1), so a message can point at the row
    df["csv_line"] = np.arange(2, len(df) + 2)
    return df


def _where(row, csv: Path) -> str:
    return f"{csv.name} line {row['csv_line']}"


def _image_files(df: pd.DataFrame, folder: Path, csv: Path, log: IssueLog) -> pd.DataFrame:
    """Add ``image_id`` and ``file`` from ``Image_name``; rows whose name is blank or would leave
    ``folder`` (``../x``, ``a/b``, an absolute path) are bad: only plain names inside it are read."""
    names = df["Image_name"].str.replace(r"\.png$", "", regex=True)
    ok = []
    for name, (_, row) in zip(names, df.iterrows()):
        plain = bool(name) and name not in (".", "..") and not any(c in name for c in "/\\") and ":" not in name
        if not plain:
            log.add(f"{csv}:{row['csv_line']}",
                    f"image name {row['Image_name']!r} is not a plain file name inside {folder} ({_where(row, csv)})")
        ok.append(plain)
    ok = np.array(ok, dtype=bool)
    df = df.assign(image_id=names, file=[str(folder / f"{n}.png") for n in names])
    return df.loc[ok]


def _blank_fields(df: pd.DataFrame, columns: list[str], csv: Path, log: IssueLog) -> pd.DataFrame:
    """Rows with a blank identifying field (a blank Patient_num would merge unrelated images into
    one patient) are bad, named by their line."""
    blank = np.zeros(len(df), dtype=bool)
    for col in columns:
        is_blank = (df[col] == "").to_numpy()
        for (_, row) in df.loc[is_blank & ~blank].iterrows():
            log.add(row["file"], f"blank {col} ({_where(row, csv)})")
        blank |= is_blank
    return df.loc[~blank]


def plane_to_label(plane: str, plane_labels: dict[str, str]) -> str | None:
    """Map a plane name (``Fetal abdomen``, ``abdomen``, ``Other`` ...) to a class, or None."""
    key = plane.strip().lower()
    table = {k.strip().lower(): v for k, v in plane_labels.items()}
    table.update({c: c for c in CLASSES})
    return table.get(key)


def _label_rows(df: pd.DataFrame, plane_col: str, cfg: dict, log: IssueLog, csv: Path) -> pd.DataFrame:
    """Add ``label``; drop excluded planes (counted), quarantine unknown ones."""
    excluded = {p.strip().lower() for p in cfg.get("exclude_planes") or []}
    is_excl = df[plane_col].str.lower().isin(excluded).to_numpy(dtype=bool)
    if is_excl.any():
        logger.info("%s: %d image(s) of excluded planes %s left out (ingestion.exclude_planes)",
                    log.domain, int(is_excl.sum()), sorted(df.loc[is_excl, plane_col].unique()))
    if len(df) and is_excl.all():
        raise BadInputError(f"{csv}: all {len(df)} row(s) are of excluded planes "
                            f"{sorted(df[plane_col].unique())} (ingestion.exclude_planes): nothing to read")
    df = df.loc[~is_excl].copy()
    df["label"] = [plane_to_label(p, cfg["plane_labels"]) for p in df[plane_col]]
    unknown = df["label"].isna().to_numpy(dtype=bool)
    for _, row in df.loc[unknown].iterrows():
        log.add(row["file"], f"unknown plane label {row[plane_col]!r} (not in ingestion.plane_labels; {_where(row, csv)})")
    return df.loc[~unknown]


def _quarantine_duplicates(df: pd.DataFrame, log: IssueLog, where: str, csv: Path | None = None) -> pd.DataFrame:
    # Which of the rows is right cannot be told, so every row of a duplicated name goes.
    counts = df["image_id"].value_counts()
    dup = (df["image_id"].map(counts) > 1).to_numpy(dtype=bool)
    for _, row in df.loc[dup].iterrows():
        if csv is not None:
            lines = df.loc[df["image_id"] == row["image_id"], "csv_line"].tolist()
            reason = (f"duplicate image name {row['image_id']!r} ({_where(row, csv)}; "
                      f"the name is on lines {', '.join(map(str, lines))} of {csv.name})")
        else:
            reason = f"duplicate image name {row['image_id']!r} ({counts[row['image_id']]} times in {where})"
        log.add(row["file"], reason)
    return df.loc[~dup]


def _quarantine_unlisted(folder: Path, listed: set[str], log: IssueLog, ignore: set[Path] = frozenset()) -> None:
    for p in sorted(folder.iterdir()):
        if is_hidden(p.name) or p in ignore or str(p) in listed:  # a listed entry: _check_missing's
            continue
        if not is_utf8_name(p):
            log.add(p, NOT_UTF8 + " (not listed in the CSV either: a CSV is UTF-8 text)", folder=p.is_dir())
        elif p.is_dir():
            log.add(p, "sub-folder inside the image folder: not part of the layout, not read", folder=True)
        elif p.suffix.lower() not in IMAGE_SUFFIXES:
            log.add(p, f"not an image file ({p.suffix or 'no extension'}) in the image folder")
        elif str(p) not in listed:
            log.add(p, "image file present but not listed in the CSV")


def _check_missing(df: pd.DataFrame, csv: Path, log: IssueLog) -> pd.DataFrame:
    """Rows whose file is missing, or is there but cannot be read as an image file
    (:func:`file_problem`: a folder, a broken or looping link, no read permission), each with its reason."""
    ok = []
    for _, row in df.iterrows():
        if not os.path.lexists(row["file"]):
            log.add(row["file"], f"listed in {csv.name} but missing ({_where(row, csv)})")
            ok.append(False)
            continue
        problem = file_problem(Path(row["file"]))
        if problem:
            log.add(row["file"], f"listed in {csv.name} ({_where(row, csv)}), but {problem}")
        ok.append(problem is None)
    return df.loc[np.array(ok, dtype=bool)]


def scan_fetal_planes_db(path: Path, cfg: dict, log: IssueLog) -> pd.DataFrame:
    """Zenodo FETAL_PLANES_DB: ``FETAL_PLANES_DB_data.csv`` (';') + ``Images/<Image_name>.png``."""
    _require_layout("fetal_planes_db", path)
    csv, images = path / FPDB_CSV, path / "Images"
    df = _read_csv(csv, ";", FPDB_COLUMNS)
    df = _image_files(df, images, csv, log)
    listed = set(df["file"])
    df = _label_rows(df, "Plane", cfg, log, csv)
    df = _blank_fields(df, ["Patient_num"], csv, log)
    df = _quarantine_duplicates(df, log, csv.name, csv)
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
    _require_layout("african", path)
    [csv] = _csv_files(path)
    df = _read_csv(csv, ",", AFRICAN_COLUMNS)
    df = _image_files(df, path, csv, log)
    # patient numbers restart in every center (patient002 exists in Egypt and Malawi)
    df = df.assign(patient_id=df["Center"] + "_" + df["Patient_num"])
    listed = set(df["file"])
    df = _label_rows(df, "Plane", cfg, log, csv)
    df = _blank_fields(df, ["Patient_num", "Center"], csv, log)
    df = _quarantine_duplicates(df, log, csv.name, csv)
    df = _check_missing(df, csv, log)
    _quarantine_unlisted(path, listed, log, ignore={csv})
    return pd.DataFrame({
        "file": df["file"], "image_id": df["image_id"], "patient_id": df["patient_id"],
        "plane": df["Plane"], "label": df["label"], "center": df["Center"], "machine": "unknown",
        "db_train": df["Train"],
    }).reset_index(drop=True)


def scan_folders(path: Path, cfg: dict, log: IssueLog) -> pd.DataFrame:
    """One sub-folder per class (``brain/``, ``Fetal brain/`` ...); no patient ids, so each image is its own patient."""
    _require_layout("folders", path)
    subdirs = _class_folders(path)
    excluded = {p.strip().lower() for p in cfg.get("exclude_planes") or []}
    rows = []
    for p in sorted(q for q in path.iterdir() if not is_hidden(q.name) and q not in subdirs):
        problem = file_problem(p)
        log.add(p, "file outside any class folder" + (f" ({problem})" if problem else ""))
    for d in subdirs:
        if not is_utf8_name(d.name):
            log.add(d, f"class folder: {NOT_UTF8}", folder=True)
            continue
        if d.name.strip().lower() in excluded:
            logger.info("%s: folder %s left out (ingestion.exclude_planes)", log.domain, d)
            continue
        label = plane_to_label(d.name, cfg["plane_labels"])
        n_logged = len(log.issues)
        files = _visible_files(d, log)
        if label is None:
            for f in files:
                log.add(f, f"unknown plane label {d.name!r} (class folder name not in ingestion.plane_labels)")
            if not files:
                log.add(d, f"unknown plane label {d.name!r} (class folder name not in ingestion.plane_labels)",
                        folder=True)
            continue
        images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
        for f in files:
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                log.add(f, f"not an image file ({f.suffix or 'no extension'})")
        if not images and len(log.issues) == n_logged:  # not when its entries are already named
            log.add(d, "empty class folder: no images", folder=True)
        for f in images:
            stem = "_".join(f.relative_to(d).with_suffix("").parts)
            rows.append({"file": str(f), "image_id": f"{label}__{stem}", "plane": d.name, "label": label,
                         "center": path.name, "machine": "unknown"})
    df = pd.DataFrame(rows, columns=["file", "image_id", "plane", "label", "center", "machine"])
    df = _quarantine_duplicates(df, log, f"folder {path}")
    df["patient_id"] = df["image_id"]
    return df.reset_index(drop=True)


SCANNERS = {"fetal_planes_db": scan_fetal_planes_db, "african": scan_african, "folders": scan_folders}


def pixel_hash(img: np.ndarray) -> str:
    """Content hash of decoded 8-bit grayscale pixels (shape included): the same picture saved
    under another name, format or colour mode (gray copied into RGB) gets the same hash."""
    h = hashlib.sha256(f"{img.shape[0]}x{img.shape[1]}:".encode())
    h.update(np.ascontiguousarray(img, dtype=np.uint8).tobytes())
    return h.hexdigest()[:32]


def load_manifest(manifest: pd.DataFrame, domain: str, cfg: dict, log: IssueLog) -> ImageSet:
    """Open, check and preprocess every image of ``manifest``; bad ones go to ``log``.

    Adds ``pixel_hash`` (:func:`pixel_hash` of the decoded image before cropping and resizing),
    used by the domain-separation check.
    """
    size = int(cfg["image_size"])
    images, keep, hashes = [], [], []
    for i, f in enumerate(tqdm(manifest["file"], desc=f"ingestion: reading {domain} images", leave=False)):
        try:
            gray = open_grayscale(Path(f), cfg["limits"], log)
            images.append(preprocess_image(gray, size, cfg["preprocess"]))
            hashes.append(pixel_hash(gray))
            keep.append(i)
        except (BadImage, ValueError) as exc:
            log.add(f, str(exc))
    meta = manifest.iloc[keep].rename(columns={"file": "source_file"}).reset_index(drop=True)
    meta = meta.drop(columns=["csv_line"], errors="ignore")
    meta["domain"] = domain
    meta["pixel_hash"] = hashes
    extra = [c for c in meta.columns if c not in META_COLUMNS]
    arr = np.stack(images) if images else np.zeros((0, size, size), np.uint8)
    return ImageSet(arr, meta[META_COLUMNS + extra], {})


def _check_required_classes(images: ImageSet, where: str, required: list[str], log: IssueLog) -> None:
    """A required class without any usable image stops the run in both modes: the configuration
    (LoRA subset, classifiers) asks for it, and going on with fewer classes would be a silent change."""
    present = set(images.meta["label"])
    missing = [c for c in required if c not in present]
    if not missing:
        return
    bad = [i for i in log.issues if i["file"] != where]
    lines = [f"  {i['file']}: {i['reason']}" for i in bad[:10]]
    more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
    raise BadInputError(
        f"{where}: empty class: no usable {', '.join(map(repr, missing))} image(s) in the {log.domain} data "
        f"({'the top-level classes' if log.domain == 'source' else f'ingestion.required_classes.{log.domain}'} "
        f"= {required}); this stops the run whatever "
        f"ingestion.on_bad_input says."
        + (f" {len(bad)} item(s) were bad:\n" + "\n".join(lines) + more if bad else "")
    )


# Patient numbers are comparable between two domains only if they come from the same numbering
# (the same database); the domain-separation check compares them then.
PATIENT_NUMBERING = {"fetal_planes_db": "fetal_planes_db", "african": "african", "phantom": "phantom",
                     "folders": None}


def read_domain(fmt: str, path: str | None, domain: str, seed: int, cfg: dict,
                required: list[str] | tuple[str, ...] = ()) -> tuple[ImageSet, pd.DataFrame]:
    """Read one domain in format ``fmt`` from ``path``; apply ``cfg['on_bad_input']``.

    ``required``: classes the domain must have a usable image of (else an "empty class"
    error, whatever ``on_bad_input`` says): the top-level ``classes`` for the source,
    ``ingestion.required_classes.target`` for the target (see the ingestion nodes).

    Returns the preprocessed ``ImageSet`` (meta columns ``META_COLUMNS`` + format extras +
    ``pixel_hash``) and the quarantine rows (``file, reason, domain``). ``info['counts']``
    holds read/kept/skipped images and skipped_folders (folder-level report rows, such as an
    empty class folder, are not images and are not counted as read).
    """
    policy = check_policy(cfg.get("on_bad_input"))  # before anything is read
    if fmt not in FORMATS:
        raise BadInputError(f"{domain}_format={fmt!r} is not one of {FORMATS}")
    log = IssueLog(domain)
    if fmt == "phantom":
        ph = cfg["phantom"][domain]
        images = generate_phantoms(domain, int(ph["n_per_class"]), int(cfg["image_size"]), int(seed),
                                   settings=ph.get("settings"),
                                   class_proportions=ph.get("class_proportions"),  # source only
                                   **({"images_per_patient": tuple(ph["images_per_patient"])}  # source only
                                      if "images_per_patient" in ph else {}))
        images.meta["pixel_hash"] = [pixel_hash(img) for img in images.images]
    else:
        if not path:
            raise BadInputError(f"{domain}_format={fmt} needs {domain}_path (a folder); got {path!r}")
        root = Path(path).expanduser().resolve()
        if not is_utf8_name(root):
            raise BadInputError(f"{shown_path(root)}: {domain}_path: {NOT_UTF8}")
        if not root.is_dir():
            raise BadInputError(f"{root}: {domain}_path is not a folder")
        manifest = SCANNERS[fmt](root, cfg, log)
        if manifest.empty and not log.issues:
            raise BadInputError(f"{root}: no images to read in the {fmt} layout")
        images = load_manifest(manifest, domain, cfg, log)
        if len(images) == 0:
            log.enforce("fail")  # names every bad item
            raise BadInputError(f"{root}: no usable image in the {domain} data")
        _check_required_classes(images, str(root), list(required or []), log)
    log.enforce(policy)
    report = log.frame()
    skipped = len(report) - log.n_folder_items
    # every examined image ends up either kept or as one quarantine row
    n_listed = len(images) + skipped
    images.info.update({"format": fmt, "path": None if fmt == "phantom" else str(root), "domain": domain,
                        "seed": int(seed), "image_size": int(cfg["image_size"]),
                        "patient_numbering": PATIENT_NUMBERING[fmt],
                        "conversions": dict(log.conversions),
                        "counts": {"read": int(n_listed), "kept": len(images), "skipped": int(skipped),
                                   "skipped_folders": int(log.n_folder_items)}})
    logger.info("%s (%s): read %d, kept %d, skipped %d (+%d folder item(s)); per class %s", domain, fmt, n_listed,
                len(images), skipped, log.n_folder_items,
                images.meta["label"].value_counts().sort_index().to_dict())
    return images, report
