"""Issue #14: every bad-input case a new user hit (45 crafted inputs), one parametrised module.

Each case is built in ``tmp_path`` from small copies of ``../shared/data`` (1 image per class)
or from phantoms, and checked at node/function level under both policies:

- ``fail``: the exception, and the named file or CSV row (line number) and reason in it;
- ``skip``: the quarantine report lists the item and no good image is lost;
- always-fatal cases raise in both modes.

A real skip-mode run (``KedroSession`` on a project copy) with an escaping image name publishes
a quarantine report that names it. The "Why" bullets of the issue and their tests:

- leakage (same folder, a copy elsewhere, shared patient ids): test_target_overlapping_source_...;
  through ``kedro run`` (rc 1, nothing published): tests/test_atomicity.py
- empty CSV, all-excluded CSV, empty African CSV: test_always_fatal_with_a_named_error
- hidden sub-folder / ``__MACOSX`` in ``folders`` (and every layout): test_hidden_files_...
- ``../`` in ``Image_name``: test_bad_item_... (escaping_name), test_skip_run_quarantines_...
- skip mode with a class without usable images: test_always_fatal_... (class_without_usable_image)
- failed run leaves versions; upstream check blind to mixed runs: tests/test_atomicity.py
- PNG checksums: test_bad_item_... (idat_crc), test_png_checksum_catches_single_byte_flips
- misspelt on_bad_input, duplicate rows' lines, read counts, blank Patient_num, split reshuffle:
  test_always_fatal_... (misspelt_policy), test_misspelt_policy_..._prerequisite_check,
  test_bad_item_... (duplicate_rows, blank_patient), test_read_counts_exclude_folder_level_rows,
  test_quarantining_one_image_moves_no_other_patient
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import base_params

from fu_kedro.data_sources import generate_phantoms
from fu_kedro.data_sources import readers as readers_module
from fu_kedro.data_sources.readers import read_domain
from fu_kedro.data_sources.separation import DomainLeakError, check_domain_separation
from fu_kedro.data_sources.validation import BadImage, BadInputError, IssueLog, open_grayscale
from fu_kedro.pipelines.ingestion.nodes import split_source_by_patient

FPDB_CSV = "FETAL_PLANES_DB_data.csv"
CLASSES = base_params("classes")  # the top-level class list: the source must have each


# --------------------------------------------------------------------------- small copies
def _fpdb_copy(src: Path, root: Path, per_class: int = 1, skip: int = 0) -> Path:
    df = pd.read_csv(src / FPDB_CSV, sep=";", dtype=str)
    df = df[df.groupby("Plane").cumcount().between(skip, skip + per_class - 1)].reset_index(drop=True)
    (root / "Images").mkdir(parents=True)
    for name in df["Image_name"]:
        shutil.copy(src / "Images" / f"{name}.png", root / "Images" / f"{name}.png")
    df.to_csv(root / FPDB_CSV, sep=";", index=False)
    return root


def _african_copy(src: Path, root: Path, per_class: int = 1, skip: int = 0) -> Path:
    df = pd.read_csv(src / "African_train.csv", dtype=str)
    df = df[df.groupby("Plane").cumcount().between(skip, skip + per_class - 1)].reset_index(drop=True)
    root.mkdir(parents=True)
    for name in df["Image_name"]:
        shutil.copy(src / f"{name}.png", root / f"{name}.png")
    df.to_csv(root / "African_train.csv", index=False)
    return root


def _folders_copy(root: Path, per_class: int = 2) -> Path:
    src = generate_phantoms("source", per_class, 64, seed=3)
    for label in sorted(set(src.meta["label"])):
        (root / label).mkdir(parents=True)
        for k in np.flatnonzero(src.meta["label"] == label):
            Image.fromarray(src.images[k]).save(root / label / f"img{k}.png")
    return root


@pytest.fixture
def params(ingestion_params):
    ingestion_params["image_size"] = 64
    return ingestion_params


@pytest.fixture
def data(tmp_path, fetal_planes_db_sample, african_planes_dev):
    """Builders of fresh copies under tmp_path: data.fpdb(), data.african(), data.folders()."""

    class Data:
        n = 0

        def _root(self, kind):
            self.n += 1
            return tmp_path / f"{kind}{self.n}"

        def fpdb(self, **kw):
            return _fpdb_copy(fetal_planes_db_sample, self._root("fpdb"), **kw)

        def african(self, **kw):
            return _african_copy(african_planes_dev, self._root("african"), **kw)

        def folders(self, **kw):
            return _folders_copy(self._root("folders"), **kw)

    return Data()


def _read(fmt, root, params, policy, domain="source", required=None):
    """One domain read as the ingestion nodes read it: the source must have every class of the
    top-level ``classes`` (``required`` overrides), the target those of ``required_classes.target``."""
    params["on_bad_input"] = policy
    if required is None and domain == "source":
        required = [] if fmt == "african" else CLASSES  # the African set has no 'other'
    elif required is None:
        required = params["required_classes"]["target"]
    return read_domain(fmt, str(root), domain, 0, params, required=required)


def _csv_rows(root: Path, fmt: str) -> tuple[Path, pd.DataFrame]:
    csv = root / (FPDB_CSV if fmt == "fetal_planes_db" else "African_train.csv")
    return csv, pd.read_csv(csv, sep=";" if fmt == "fetal_planes_db" else ",", dtype=str)


def _write_rows(csv: Path, rows: pd.DataFrame, fmt: str) -> None:
    rows.to_csv(csv, sep=";" if fmt == "fetal_planes_db" else ",", index=False)


def _image_of_row(root: Path, fmt: str, rows: pd.DataFrame, i: int) -> Path:
    folder = root / "Images" if fmt == "fetal_planes_db" else root
    return folder / f"{rows.loc[i, 'Image_name']}.png"


# --------------------------------------------------------------------------- bad rows and files
# Each builder edits a fresh copy and returns (named file or CSV row, reason fragment, number of
# report rows, the image files that are rightly not kept).
def _escaping_name(root, fmt):
    csv, rows = _csv_rows(root, fmt)
    outside = root.parent / f"{root.name}_outside.png"
    shutil.copy(_image_of_row(root, fmt, rows, 0), outside)  # a real image the name points at
    up = "../../" if fmt == "fetal_planes_db" else "../"
    extra = rows.iloc[[1]].assign(Image_name=f"{up}{outside.stem}")
    _write_rows(csv, pd.concat([rows, extra], ignore_index=True), fmt)
    return f"{csv}:{len(rows) + 2}", "is not a plain file name inside", 1, set()


def _blank_cell(root, fmt, column: str, row: int):
    """One row's ``column`` left empty: that row's image is the bad input (CSV line = row + 2)."""
    csv, rows = _csv_rows(root, fmt)
    rows.loc[row, column] = ""
    _write_rows(csv, rows, fmt)
    bad = str(_image_of_row(root, fmt, rows, row))
    return bad, f"blank {column} ({csv.name} line {row + 2})", 1, {bad}


def _blank_patient(root, fmt):
    return _blank_cell(root, fmt, "Patient_num", 2)


def _blank_center(root, fmt):
    return _blank_cell(root, fmt, "Center", 1)


def _duplicate_rows(root, fmt):
    csv, rows = _csv_rows(root, fmt)
    dup = rows.iloc[[0]].assign(Plane="Fetal brain")
    _write_rows(csv, pd.concat([rows, dup], ignore_index=True), fmt)
    bad = str(_image_of_row(root, fmt, rows, 0))
    return bad, f"the name is on lines 2, {len(rows) + 2} of {csv.name}", 2, {bad}


def _flip_in_idat(path: Path) -> None:
    """Flip one byte inside the first IDAT chunk's data (its CRC no longer matches)."""
    data = bytearray(path.read_bytes())
    pos = 8
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        if data[pos + 4:pos + 8] == b"IDAT":
            data[pos + 8 + length // 2] ^= 0x01
            path.write_bytes(bytes(data))
            return
        pos += 12 + length
    raise AssertionError(f"{path}: no IDAT chunk")


def _idat_crc(root, fmt):
    _, rows = _csv_rows(root, fmt)
    bad = _image_of_row(root, fmt, rows, 1)
    _flip_in_idat(bad)
    return str(bad), "integrity check failed", 1, {str(bad)}


def _missing_image(root, fmt):
    csv, rows = _csv_rows(root, fmt)
    bad = _image_of_row(root, fmt, rows, 0)
    bad.unlink()
    return str(bad), f"listed in {csv.name} but missing ({csv.name} line 2)", 1, {str(bad)}


BAD_ITEMS = [
    ("fetal_planes_db", _escaping_name),
    ("african", _escaping_name),
    ("fetal_planes_db", _blank_patient),
    ("african", _blank_patient),
    ("african", _blank_center),
    ("fetal_planes_db", _duplicate_rows),
    ("african", _duplicate_rows),
    ("fetal_planes_db", _idat_crc),
    ("african", _idat_crc),
    ("fetal_planes_db", _missing_image),
]


@pytest.mark.parametrize("fmt, build", BAD_ITEMS, ids=[f"{f}-{b.__name__[1:]}" for f, b in BAD_ITEMS])
def test_bad_item_named_in_fail_and_quarantined_in_skip(data, params, fmt, build):
    root = data.fpdb() if fmt == "fetal_planes_db" else data.african(per_class=2)
    none = []  # no required class: 1 image per class, the bad one may be its class's only one
    good_before, _ = _read(fmt, root, params, "fail", required=none)
    named, reason, n_rows, lost = build(root, fmt)
    with pytest.raises(BadInputError) as err:
        _read(fmt, root, params, "fail", required=none)
    assert named in str(err.value) and reason in str(err.value), str(err.value)

    images, report = _read(fmt, root, params, "skip", required=none)
    assert len(report) == n_rows, report
    assert (report["file"] == named).all() and report["reason"].str.contains(reason, regex=False).any(), report
    # no good image lost: exactly the images that were fine before, minus the bad one(s)
    assert sorted(images.meta["source_file"]) == sorted(set(good_before.meta["source_file"]) - lost)
    assert all(f.startswith(str(root) + "/") for f in images.meta["source_file"])  # nothing read from outside
    assert images.info["counts"] == {"read": len(images) + n_rows, "kept": len(images), "skipped": n_rows,
                                     "skipped_folders": 0}


def test_png_checksum_catches_single_byte_flips(tmp_path):
    """Every one of 200 seeded single-byte flips of a PNG is rejected or gives the same pixels."""
    src = generate_phantoms("source", 1, 64, seed=1).images[0]
    good = tmp_path / "good.png"
    Image.fromarray(src).save(good)
    data = good.read_bytes()
    rng = np.random.default_rng(0)
    limits = {"min_side": 8, "max_side": 8192, "max_aspect": 4.0, "min_dynamic_range": 0}
    silent = []
    for k, pos in enumerate(rng.choice(len(data), size=200, replace=False)):
        bad = bytearray(data)
        bad[pos] ^= 1 << int(rng.integers(8))
        f = tmp_path / f"flip{k}.png"
        f.write_bytes(bytes(bad))
        try:
            arr = open_grayscale(f, limits, IssueLog("source"))
        except BadImage:
            continue
        if arr.shape != src.shape or not np.array_equal(arr, src):
            silent.append(int(pos))
    assert not silent, f"flips at bytes {silent} gave different pixels without an error"


# --------------------------------------------------------------------------- always fatal
def _header_only(root, fmt):
    csv, rows = _csv_rows(root, fmt)
    _write_rows(csv, rows.iloc[:0], fmt)
    return str(csv), "no data rows"


def _all_excluded(root, fmt):
    csv, rows = _csv_rows(root, fmt)
    rows["Plane"] = "Maternal cervix"
    _write_rows(csv, rows, fmt)
    return str(csv), "are of excluded planes"


def _class_without_usable_image(root, fmt):
    _, rows = _csv_rows(root, fmt)
    for i in rows.index[rows["Plane"] == "Fetal femur"]:
        _image_of_row(root, fmt, rows, i).write_bytes(b"not a png")
    return str(root), "empty class: no usable 'femur'"


def _misspelt_policy(root, fmt):
    return "ingestion.on_bad_input", "must be one of ('fail', 'skip'), got 'skp'"


FATAL = [
    ("fetal_planes_db", _header_only),
    ("african", _header_only),
    ("fetal_planes_db", _all_excluded),
    ("african", _all_excluded),
    ("fetal_planes_db", _class_without_usable_image),
    ("fetal_planes_db", _misspelt_policy),
]


@pytest.mark.parametrize("policy", ["fail", "skip"])
@pytest.mark.parametrize("fmt, build", FATAL, ids=[f"{f}-{b.__name__[1:]}" for f, b in FATAL])
def test_always_fatal_with_a_named_error(data, params, fmt, build, policy, monkeypatch):
    root = data.fpdb() if fmt == "fetal_planes_db" else data.african()
    named, reason = build(root, fmt)
    opened = []
    real_open = readers_module.open_grayscale
    monkeypatch.setattr(readers_module, "open_grayscale", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    if build is _misspelt_policy:
        policy = "skp"
    required = CLASSES  # the top-level `classes`: the source must have each
    if build is _class_without_usable_image and fmt == "african":
        required = ["femur"]
    params["on_bad_input"] = policy
    with pytest.raises(BadInputError) as err:
        read_domain(fmt, str(root), "source", 0, params, required=required)
    assert named in str(err.value) and reason in str(err.value), str(err.value)
    assert not isinstance(err.value, KeyError)
    if build is _misspelt_policy:
        assert not opened  # rejected before any image was read


# --------------------------------------------------------------------------- hidden items
def _hidden_subfolder(root, fmt):
    folder = root / "abdomen" if fmt == "folders" else (root / "Images" if fmt == "fetal_planes_db" else root)
    thumbs = folder / ".thumbnails"
    thumbs.mkdir()
    shutil.copy(next(folder.glob("*.png")), thumbs / "x.png")


def _macosx_folder(root, fmt):
    mac = root / "__MACOSX"
    (mac / "abdomen").mkdir(parents=True)
    (mac / "abdomen" / "._img0.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (mac / "stray.png").write_bytes(b"junk")


def _thumbs_db(root, fmt):
    folder = root / "brain" if fmt == "folders" else (root / "Images" if fmt == "fetal_planes_db" else root)
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")


HIDDEN = [(f, b) for f in ("folders", "fetal_planes_db", "african") for b in (_hidden_subfolder, _macosx_folder, _thumbs_db)]


@pytest.mark.parametrize("fmt, build", HIDDEN, ids=[f"{f}-{b.__name__[1:]}" for f, b in HIDDEN])
def test_hidden_files_and_folders_are_ignored_in_every_layout(data, params, fmt, build):
    root = {"folders": data.folders, "fetal_planes_db": data.fpdb, "african": data.african}[fmt]()
    before, _ = _read(fmt, root, params, "fail")
    build(root, fmt)
    after, report = _read(fmt, root, params, "fail")
    assert report.empty
    assert after.meta["source_file"].tolist() == before.meta["source_file"].tolist()
    assert not after.meta["source_file"].str.contains(r"/\.|__MACOSX", regex=True).any()


def test_read_counts_exclude_folder_level_rows(data, params):
    root = data.folders()
    (root / "thorax_extra").mkdir()  # an unknown, empty class folder: a folder-level row
    for f in (root / "thorax").iterdir():
        f.unlink()  # empty class folder: a folder-level row
    images, report = _read("folders", root, params, "skip", required=[])
    assert len(report) == 2 and set(report["file"]) == {str(root / "thorax"), str(root / "thorax_extra")}
    assert images.info["counts"] == {"read": 8, "kept": 8, "skipped": 0, "skipped_folders": 2}


# --------------------------------------------------------------------------- entries that are no image file
# Issue #27: each entry below used to crash the run without a file name (a non-UTF-8 name), be
# dropped silently (folders layout) or be called "listed but missing" (CSV layouts). Each builder
# puts one such entry where an image belongs and returns (the name as the report shows it, reason).
def _target_of(root: Path, fmt: str) -> tuple[Path, Path | None]:
    """Where the entry goes: (folder, the listed image it replaces: None for the folders layout)."""
    if fmt == "folders":
        return root / "brain", None
    _, rows = _csv_rows(root, fmt)
    listed = _image_of_row(root, fmt, rows, 1)
    return listed.parent, listed


def _non_utf8_name(root, fmt):
    folder, _ = _target_of(root, fmt)
    raw = os.fsencode(folder) + b"/scan_caf\xe9.png"  # a Latin-1 name from an old archive
    shutil.copy(next(folder.glob("*.png")), raw)
    return f"{folder}/scan_caf\\xe9.png", "file name is not valid UTF-8"


def _replace(root, fmt, make) -> Path:
    folder, listed = _target_of(root, fmt)
    entry = listed or folder / "entry.png"
    if listed:
        listed.unlink()
    make(entry)
    return entry


def _dangling_link(root, fmt):
    entry = _replace(root, fmt, lambda e: os.symlink(e.parent / "gone.png", e))
    return str(entry), "broken symbolic link: it points to"


def _looping_link(root, fmt):
    entry = _replace(root, fmt, lambda e: os.symlink(e.name, e))
    return str(entry), "symbolic link loop"


def _folder_named_png(root, fmt):
    entry = _replace(root, fmt, lambda e: e.mkdir())
    return str(entry), "a folder named like an image file"


def _folder_link_named_png(root, fmt):
    entry = _replace(root, fmt, lambda e: os.symlink(root.parent, e))
    return str(entry), f"a folder (a symbolic link to {root.parent}) named like an image file"


def _multi_frame_tiff(root, fmt):
    folder, listed = _target_of(root, fmt)
    entry = listed or folder / "cine.png"
    frame = Image.open(next(p for p in folder.glob("*.png") if p != entry)).convert("L")
    frame.save(entry, format="TIFF", save_all=True, append_images=[frame, frame])  # a 3-frame stack named .png
    return str(entry), "multi-frame TIFF (3 frames"


NOT_AN_IMAGE_FILE = [(f, b) for f in ("folders", "fetal_planes_db", "african")
                     for b in (_non_utf8_name, _dangling_link, _looping_link, _folder_named_png,
                               _folder_link_named_png, _multi_frame_tiff)]


@pytest.mark.parametrize("fmt, build", NOT_AN_IMAGE_FILE, ids=[f"{f}-{b.__name__[1:]}" for f, b in NOT_AN_IMAGE_FILE])
def test_entries_that_are_no_image_file_are_named_never_dropped(data, params, fmt, build, tmp_path):
    """fail: one error naming the entry and the reason; skip: one report row for it, and the report
    and the image set can be written (a non-UTF-8 name once crashed both, naming no file)."""
    from fu_kedro.datasets import ImageSetDataset

    root = {"folders": data.folders, "fetal_planes_db": data.fpdb, "african": lambda: data.african(per_class=2)}[fmt]()
    named, reason = build(root, fmt)
    with pytest.raises(BadInputError) as err:
        _read(fmt, root, params, "fail", required=[])
    text = str(err.value)
    assert f"{named}: " in text and reason in text, text
    assert "listed in" not in text or "but missing" not in text, text  # it is there: not "missing"
    text.encode("utf-8")  # printable as it is
    images, report = _read(fmt, root, params, "skip", required=[])
    assert report["file"].tolist() == [named], report
    assert reason in report.loc[0, "reason"], report
    report.to_csv(tmp_path / "report.csv", index=False)  # what the catalog does with the quarantine report
    ImageSetDataset(str(tmp_path / "images")).save(images)
    assert not images.meta["source_file"].str.contains(Path(named).name, regex=False).any()


def test_tiff_content_in_a_png_file_is_read_and_recorded(data, params):
    """A one-frame TIFF saved as .png is read by its content, and the conversion is recorded."""
    root = data.folders()
    victim = sorted((root / "brain").glob("*.png"))[0]
    Image.open(victim).save(victim, format="TIFF")
    images, report = _read("folders", root, params, "fail")
    assert report.empty and str(victim) in set(images.meta["source_file"])
    assert images.info["conversions"] == {"TIFF content in a .png file, read as TIFF": 1}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file whatever its mode: no permission error to see")
@pytest.mark.parametrize("what", ["file", "class_folder"])
def test_permission_denied_is_said_not_corrupt_or_empty(data, params, what):
    root = data.folders()
    entry = sorted((root / "brain").glob("*.png"))[0] if what == "file" else root / "brain"
    entry.chmod(0)
    try:
        with pytest.raises(BadInputError) as err:
            _read("folders", root, params, "fail", required=[])
    finally:
        entry.chmod(0o755)
    text = str(err.value)
    assert f"{entry}: " in text and "permission denied" in text, text
    assert "corrupt" not in text and "empty class folder" not in text, text


# --------------------------------------------------------------------------- domain separation
def _same_folder(data, params):
    root = data.fpdb()
    return ("fetal_planes_db", root), ("fetal_planes_db", root), "the same folder"


def _copy_elsewhere(data, params):
    root = data.fpdb()
    copy = root.parent / "copy_of_source"
    shutil.copytree(root, copy)
    return ("fetal_planes_db", root), ("fetal_planes_db", copy), "5 target image(s) with the same decoded pixels"


def _shared_patients(data, params):
    # target: other images of the same African patients (a subset sharing patient ids)
    src = data.african(per_class=1)
    tgt = data.african(per_class=1)
    rows = pd.read_csv(tgt / "African_train.csv", dtype=str)
    src_rows = pd.read_csv(src / "African_train.csv", dtype=str)
    rows.loc[:1, ["Patient_num", "Center"]] = src_rows.loc[:1, ["Patient_num", "Center"]].to_numpy()
    # give the target its own pictures under new names (no file or pixel overlap)
    for i, name in enumerate(rows["Image_name"]):
        img = np.asarray(Image.open(tgt / f"{name}.png").convert("L")).copy()
        img[0, 0] = 255 - img[0, 0]
        (tgt / f"{name}.png").unlink()
        Image.fromarray(img).save(tgt / f"t{i}_{name}.png")
        rows.loc[i, "Image_name"] = f"t{i}_{name}"
    rows.to_csv(tgt / "African_train.csv", index=False)
    return ("african", src), ("african", tgt), "patient id(s) in both domains under the same patient numbering (african)"


def _pixel_copy_renamed_rgb(data, params):
    src = data.folders()
    tgt = data.folders()
    shutil.rmtree(tgt / "other")
    first = sorted((src / "brain").glob("*.png"))[0]
    Image.open(first).convert("RGB").save(tgt / "brain" / "renamed_copy.png")
    return ("folders", src), ("folders", tgt), "same decoded pixels"


LEAKS = [_same_folder, _copy_elsewhere, _shared_patients, _pixel_copy_renamed_rgb]


@pytest.mark.parametrize("policy", ["fail", "skip"])
@pytest.mark.parametrize("build", LEAKS, ids=[b.__name__[1:] for b in LEAKS])
def test_target_overlapping_source_is_always_fatal(data, params, build, policy):
    (sfmt, sroot), (tfmt, troot), reason = build(data, params)
    params["on_bad_input"] = policy
    source, _ = read_domain(sfmt, str(sroot), "source", 0, params, required=[])
    target, _ = read_domain(tfmt, str(troot), "target", 0, params)
    with pytest.raises(DomainLeakError) as err:
        check_domain_separation(source, target, params["near_duplicate_max_distance"])
    text = str(err.value)
    assert reason in text and "domain separation" in text, text
    assert str(sroot) in text  # names where it came from


def test_disjoint_real_domains_pass(data, params):
    source, _ = _read("fetal_planes_db", data.fpdb(), params, "fail")
    target, _ = _read("african", data.african(), params, "fail", domain="target")
    check_domain_separation(source, target, params["near_duplicate_max_distance"])
    src, tgt = generate_phantoms("source", 4, 32, seed=1), generate_phantoms("target", 4, 32, seed=1)
    check_domain_separation(src, tgt, params["near_duplicate_max_distance"])


def _one_pixel_changed(img: np.ndarray) -> np.ndarray:
    out = img.copy()
    y, x = out.shape[0] // 2, out.shape[1] // 2
    out[y, x] = 255 - out[y, x]
    return out


NEAR_DUPLICATES = {
    "one_pixel": _one_pixel_changed,
    "flipped_left_right": lambda a: a[:, ::-1],
    "upside_down": lambda a: a[::-1, :],
    "jpeg_q75": None,  # saved as JPEG (quality 75) under a .png name's stem
}


@pytest.mark.parametrize("edit", list(NEAR_DUPLICATES))
def test_near_duplicate_source_images_in_the_target_are_a_leak(data, params, edit, tmp_path):
    """Issue #27: three real source images with one pixel changed (or flipped, or re-saved as JPEG)
    put into a real target folder passed the exact-pixel check and were published as the target."""
    sroot = data.fpdb()
    troot = data.african(per_class=2)
    rows = pd.read_csv(troot / "African_train.csv", dtype=str)
    src_files = sorted((sroot / "Images").glob("*.png"))[:3]
    for k, f in enumerate(src_files):
        img = np.asarray(Image.open(f).convert("L"))
        name = f"leak{k}"
        if NEAR_DUPLICATES[edit] is None:
            Image.fromarray(img).save(troot / f"{name}.png", format="JPEG", quality=75)
        else:
            Image.fromarray(np.ascontiguousarray(NEAR_DUPLICATES[edit](img))).save(troot / f"{name}.png")
        rows = pd.concat([rows, rows.iloc[[k]].assign(Image_name=name, Patient_num=f"leak{k}")], ignore_index=True)
    rows.to_csv(troot / "African_train.csv", index=False)
    source, _ = _read("fetal_planes_db", sroot, params, "fail")
    target, _ = _read("african", troot, params, "fail", domain="target")
    with pytest.raises(DomainLeakError) as err:
        check_domain_separation(source, target, params["near_duplicate_max_distance"])
    text = str(err.value)
    assert "3 target image(s) nearly identical to a source image" in text, text
    assert "same decoded pixels" not in text or edit == "jpeg_q75", text
    for f in src_files:
        assert str(f) in text or "..." in text
    assert f"{troot}/leak0.png" in text and "near_duplicate_max_distance" in text, text
    check_domain_separation(source, target, None)  # null turns the near-duplicate check off (a WARNING says so)


@pytest.mark.slow
def test_near_duplicate_threshold_has_no_false_positive_on_real_pairs(fetal_planes_db_sample, african_planes_dev,
                                                                      ingestion_params):
    """The calibration docs/results/2026-12-03-near-duplicates.md reports: every one of the 100 x 217 real source-vs-target
    pairs (shared FETAL_PLANES_DB sample vs african_planes_dev, 128 px as ingested) is further apart
    than the threshold, by a wide margin; and edited copies of source images fall within it."""
    from fu_kedro.data_sources.separation import nearest_source, perceptual_hashes

    limit = ingestion_params["near_duplicate_max_distance"]
    src, _ = read_domain("fetal_planes_db", str(fetal_planes_db_sample), "source", 42, ingestion_params)
    tgt, _ = read_domain("african", str(african_planes_dev), "target", 42, ingestion_params)
    best, _ = nearest_source(perceptual_hashes(src.images, flips=True), perceptual_hashes(tgt.images))
    assert len(best) == 217 and best.min() > 2 * limit, sorted(best)[:5]
    edited = np.stack([_one_pixel_changed(src.images[i]) for i in range(20)]
                      + [src.images[i][:, ::-1] for i in range(20, 40)])
    near, which = nearest_source(perceptual_hashes(src.images, flips=True), perceptual_hashes(edited))
    assert near.max() <= limit and (which == np.arange(40)).all(), near


# --------------------------------------------------------------------------- split stability
def test_quarantining_one_image_moves_no_other_patient(data, params, fetal_planes_db_sample):
    """Skip one image: every other patient keeps its side of the train/val split."""
    root = data.fpdb(per_class=8)
    params["val_fraction"] = 0.3
    full, _ = _read("fetal_planes_db", root, params, "skip")
    before = split_source_by_patient(full, 42, params).meta.set_index("image_id")
    victim = before[before["split"] == "val"].index[0]  # a val image, so its class balance changes too
    (root / "Images" / f"{victim}.png").write_bytes(b"corrupt")
    fewer, report = _read("fetal_planes_db", root, params, "skip")
    assert len(report) == 1 and victim in report.loc[0, "file"]
    after = split_source_by_patient(fewer, 42, params).meta.set_index("image_id")
    assert len(after) == len(before) - 1
    assert set(before["split"]) == {"train", "val"}
    common = after.index
    assert (after.loc[common, "split"] == before.loc[common, "split"]).all()
    # and the same holds when a whole patient disappears from a phantom set
    src = generate_phantoms("source", 30, 32, seed=5)
    b = split_source_by_patient(src, 1, params).meta
    gone = b["patient_id"].iloc[0]
    a = split_source_by_patient(src.select(src.meta["patient_id"] != gone), 1, params).meta
    assert a.set_index("image_id")["split"].equals(b[b["patient_id"] != gone].set_index("image_id")["split"])


# --------------------------------------------------------------------------- a real run
@pytest.mark.slow
def test_skip_run_quarantines_an_escaping_name_and_publishes_the_report(project_copy, data, tmp_path):
    """Skip mode, real ingestion run: the row whose Image_name leaves the dataset folder is in the
    published quarantine report with its CSV line, and every good image is in source_images."""
    from conftest import run_kedro_session

    root = data.fpdb()
    named, reason, _, _ = _escaping_name(root, "fetal_planes_db")
    run_kedro_session(project_copy, "ingestion", {
        "source_format": "fetal_planes_db", "source_path": str(root),
        "ingestion": {"on_bad_input": "skip", "image_size": 48, "val_fraction": 0, "lora_per_class": 1,
                      "phantom": {"target": {"n_per_class": 2}}, "preview": {"per_class": 1}}})
    [report_csv] = (project_copy / "data" / "08_reporting" / "quarantine_report.csv").glob("*/quarantine_report.csv")
    report = pd.read_csv(report_csv)
    assert report["file"].tolist() == [named] and reason in report.loc[0, "reason"]
    [source] = (project_copy / "data" / "03_primary" / "source_images").glob("*/source_images")
    meta = pd.read_csv(source / "metadata.csv")
    assert len(meta) == 5 and meta["source_file"].str.startswith(str(root / "Images") + "/").all()


def test_misspelt_policy_and_hidden_csv_in_the_prerequisite_check(tmp_path, african_planes_dev):
    """Before any node runs: a misspelt on_bad_input is named (the parameters' schema, whose hook
    runs first); a macOS ``._x.csv`` beside the African CSV is not taken for a second CSV."""
    from conftest import project_parameters

    from fu_kedro.params import check_parameters
    from fu_kedro.prerequisites import find_missing_prerequisites
    from fu_kedro.pipelines.ingestion.pipeline import create_pipeline
    from fu_kedro.schema import ParameterError

    root = _african_copy(african_planes_dev, tmp_path / "african")
    (root / "._African_train.csv").write_bytes(b"\x00\x05\x16\x07")
    params = {"source_format": "phantom", "target_format": "african", "target_path": str(root),
              "ingestion": {"on_bad_input": "fail"}}
    problems, _ = find_missing_prerequisites(create_pipeline(), None, params)
    assert problems == []
    with pytest.raises(ParameterError, match=r"ingestion\.on_bad_input: 'skp' in ingestion; allowed values: 'fail' or 'skip'"):
        check_parameters(project_parameters("base", {"ingestion": {"on_bad_input": "skp"}}), ["ingestion"])


def test_layout_and_setting_problems_give_no_download_advice(tmp_path, african_planes_dev):
    """Issue #27: a two-CSV folder and a policy typo were answered with "download it from zenodo";
    the data are there, so the message says what to fix instead (a missing folder still gets the advice;
    a policy typo is the parameters' schema's, before this check)."""
    from fu_kedro.pipelines.ingestion.pipeline import create_pipeline
    from fu_kedro.prerequisites import find_missing_prerequisites, format_problems

    root = _african_copy(african_planes_dev, tmp_path / "african")
    shutil.copy(root / "African_train.csv", root / "African_copy.csv")
    base = {"source_format": "phantom", "target_format": "african", "target_path": str(root),
            "ingestion": {"on_bad_input": "fail"}}
    [p], _ = find_missing_prerequisites(create_pipeline(), None, base)
    text = format_problems([p], None)
    assert "holds 2 CSV files" in p.detail and "Arrange the folder" in p.detail, text
    assert "zenodo" not in text and "download" not in text.lower() and "are missing" not in text, text
    [p], _ = find_missing_prerequisites(create_pipeline(), None, {**base, "target_path": str(tmp_path / "nowhere")})
    text = format_problems([p], None)
    assert "does not exist" in text and "zenodo.org/records/7540448" in text and "What to download" in text, text


def test_pinning_an_output_of_the_run_is_named_before_any_node_runs(tmp_path):
    """Issue #27: `--load-versions source_images:<v>` on an ingestion run ended in an internal
    `.staging/...` path after the readers had run; now the pre-run check names the dataset."""
    from fu_kedro.pipelines.ingestion.pipeline import create_pipeline
    from fu_kedro.prerequisites import find_missing_prerequisites, format_problems

    params = {"source_format": "phantom", "target_format": "phantom", "ingestion": {"on_bad_input": "fail"}}
    problems, _ = find_missing_prerequisites(create_pipeline(), None, params,
                                             run_params={"load_versions": {"source_images": "2020-01-01T00.00.00.000Z"}})
    [p] = problems
    text = format_problems(problems, None)
    assert "`source_images` is an output of this run (made by split_source_by_patient_node)" in text, text
    assert "--from-nodes draw_lora_subset_node --load-versions source_images:2020-01-01T00.00.00.000Z" in text, text
    assert ".staging" not in text and "download" not in text.lower()
