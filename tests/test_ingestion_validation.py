"""Every bad-input case: built in tmp_path from a copy of the shared sample or from phantoms;
under ``fail`` the error names the file, under ``skip`` the quarantine report lists it and
nothing else is dropped."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import base_params

from fu_kedro.data_sources.readers import read_domain
from fu_kedro.data_sources.validation import BadInputError

PER_CLASS = 2


@pytest.fixture
def fpdb_copy(tmp_path, fetal_planes_db_sample) -> Path:
    """A 10-image copy (2 per class) of the FETAL_PLANES_DB sample, same layout and CSV header."""
    df = pd.read_csv(fetal_planes_db_sample / "FETAL_PLANES_DB_data.csv", sep=";", dtype=str)
    df = df.groupby("Plane", group_keys=False).head(PER_CLASS).reset_index(drop=True)
    root = tmp_path / "fpdb"
    (root / "Images").mkdir(parents=True)
    for name in df["Image_name"]:
        shutil.copy(fetal_planes_db_sample / "Images" / f"{name}.png", root / "Images" / f"{name}.png")
    df.to_csv(root / "FETAL_PLANES_DB_data.csv", sep=";", index=False)
    assert "Train " in (root / "FETAL_PLANES_DB_data.csv").read_text().splitlines()[0]
    return root


@pytest.fixture
def african_copy(tmp_path, african_planes_dev) -> Path:
    """An 8-image copy of the African dev set (2 per class, grayscale and RGB files)."""
    df = pd.read_csv(african_planes_dev / "African_train.csv", dtype=str)
    df = df.groupby("Plane", group_keys=False).head(PER_CLASS).reset_index(drop=True)
    root = tmp_path / "african"
    root.mkdir()
    for name in df["Image_name"]:
        shutil.copy(african_planes_dev / f"{name}.png", root / f"{name}.png")
    df.to_csv(root / "African_test.csv", index=False)
    return root


def _csv(root: Path) -> Path:
    return root / "FETAL_PLANES_DB_data.csv"


def _rows(root: Path) -> pd.DataFrame:
    return pd.read_csv(_csv(root), sep=";", dtype=str)


CLASSES = base_params("classes")  # the top-level class list: the source must have each


def _first_image(root: Path) -> Path:
    return root / "Images" / f"{_rows(root)['Image_name'][0]}.png"


def _read(root, params, policy, fmt="fetal_planes_db", required=CLASSES):
    """The source read as the ingestion node reads it: ``required`` = the top-level ``classes``."""
    params["on_bad_input"] = policy
    return read_domain(fmt, str(root), "source", 0, params, required=required)


def _assert_fail_names(root, params, file_part, reason_part, fmt="fetal_planes_db", required=CLASSES):
    with pytest.raises(BadInputError) as err:
        _read(root, params, "fail", fmt, required)
    assert str(file_part) in str(err.value) and reason_part in str(err.value), str(err.value)


def _assert_skip_lists(root, params, file_part, reason_part, n_good, fmt="fetal_planes_db", folder=False,
                       required=CLASSES):
    images, report = _read(root, params, "skip", fmt, required)
    assert len(report) == 1, report
    assert str(file_part) in report.loc[0, "file"] and reason_part in report.loc[0, "reason"]
    assert report.loc[0, "domain"] == "source"
    assert len(images) == n_good  # nothing else dropped
    # a folder-level row (empty class folder) is reported but is not an image read
    assert images.info["counts"] == {"read": n_good + (not folder), "kept": n_good, "skipped": int(not folder),
                                     "skipped_folders": int(folder)}
    return images


def test_clean_copy_reads_everything(fpdb_copy, ingestion_params):
    images, report = _read(fpdb_copy, ingestion_params, "fail")
    assert len(images) == 5 * PER_CLASS and report.empty
    assert list(report.columns) == ["file", "reason", "domain"]


def test_corrupt_file(fpdb_copy, ingestion_params):
    bad = _first_image(fpdb_copy)
    bad.write_bytes(b"this is not a png at all" * 20)
    _assert_fail_names(fpdb_copy, ingestion_params, bad, "not a decodable image")
    _assert_skip_lists(fpdb_copy, ingestion_params, bad, "not a decodable image", 5 * PER_CLASS - 1)


def test_truncated_file(fpdb_copy, ingestion_params):
    bad = _first_image(fpdb_copy)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    _assert_fail_names(fpdb_copy, ingestion_params, bad, "truncated")
    _assert_skip_lists(fpdb_copy, ingestion_params, bad, "truncated", 5 * PER_CLASS - 1)


def test_listed_but_missing(fpdb_copy, ingestion_params):
    bad = _first_image(fpdb_copy)
    bad.unlink()
    _assert_fail_names(fpdb_copy, ingestion_params, bad, "listed in FETAL_PLANES_DB_data.csv but missing")
    _assert_skip_lists(fpdb_copy, ingestion_params, bad, "but missing", 5 * PER_CLASS - 1)


def test_present_but_not_listed(fpdb_copy, ingestion_params):
    extra = fpdb_copy / "Images" / "Patient99999_Plane1_1_of_1.png"
    shutil.copy(_first_image(fpdb_copy), extra)
    _assert_fail_names(fpdb_copy, ingestion_params, extra, "not listed in the CSV")
    _assert_skip_lists(fpdb_copy, ingestion_params, extra, "not listed", 5 * PER_CLASS)


def test_unknown_label(fpdb_copy, ingestion_params):
    rows = _rows(fpdb_copy)
    rows.loc[0, "Plane"] = "Fetal heart"
    rows.to_csv(_csv(fpdb_copy), sep=";", index=False)
    bad = _first_image(fpdb_copy)
    _assert_fail_names(fpdb_copy, ingestion_params, bad, "unknown plane label 'Fetal heart'")
    _assert_skip_lists(fpdb_copy, ingestion_params, bad, "unknown plane label", 5 * PER_CLASS - 1)


def test_excluded_plane_is_left_out_without_being_bad(fpdb_copy, ingestion_params):
    rows = _rows(fpdb_copy)
    rows.loc[0, "Plane"] = "Maternal cervix"
    rows.to_csv(_csv(fpdb_copy), sep=";", index=False)
    images, report = _read(fpdb_copy, ingestion_params, "fail")
    assert len(images) == 5 * PER_CLASS - 1 and report.empty
    assert rows.loc[0, "Image_name"] not in set(images.meta["image_id"])


def test_duplicate_names(fpdb_copy, ingestion_params):
    rows = _rows(fpdb_copy)
    dup = rows.iloc[[0]].assign(Plane="Fetal brain")
    pd.concat([rows, dup]).to_csv(_csv(fpdb_copy), sep=";", index=False)
    bad = _first_image(fpdb_copy)
    _assert_fail_names(fpdb_copy, ingestion_params, bad, "duplicate image name")
    images, report = _read(fpdb_copy, ingestion_params, "skip")
    # which row is right cannot be told: both rows go, and only they
    assert len(report) == 2 and set(report["file"]) == {str(bad)}
    assert len(images) == 5 * PER_CLASS - 1


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_wrong_separator_always_raises_naming_the_csv(fpdb_copy, ingestion_params, policy):
    _rows(fpdb_copy).to_csv(_csv(fpdb_copy), sep=",", index=False)
    with pytest.raises(BadInputError) as err:
        _read(fpdb_copy, ingestion_params, policy)
    assert str(_csv(fpdb_copy)) in str(err.value) and "wrong separator" in str(err.value)


def test_missing_column_raises_naming_the_csv_and_column(fpdb_copy, ingestion_params):
    _rows(fpdb_copy).drop(columns=["US_Machine"]).to_csv(_csv(fpdb_copy), sep=";", index=False)
    with pytest.raises(BadInputError) as err:
        _read(fpdb_copy, ingestion_params, "skip")
    assert str(_csv(fpdb_copy)) in str(err.value) and "US_Machine" in str(err.value)


def test_empty_class_in_csv_formats(fpdb_copy, ingestion_params):
    rows = _rows(fpdb_copy)
    femur = rows["Plane"] == "Fetal femur"
    for name in rows.loc[femur, "Image_name"]:
        (fpdb_copy / "Images" / f"{name}.png").unlink()
    rows[~femur].to_csv(_csv(fpdb_copy), sep=";", index=False)
    _assert_fail_names(fpdb_copy, ingestion_params, fpdb_copy, "empty class: no usable 'femur'")
    # a required class without images is fatal under skip too (the rest of the config asks for it)
    with pytest.raises(BadInputError, match="empty class: no usable 'femur'"):
        _read(fpdb_copy, ingestion_params, "skip")


def test_non_image_file(fpdb_copy, ingestion_params):
    notes = fpdb_copy / "Images" / "notes.txt"
    notes.write_text("scanned on Tuesday")
    _assert_fail_names(fpdb_copy, ingestion_params, notes, "not an image file (.txt)")
    _assert_skip_lists(fpdb_copy, ingestion_params, notes, "not an image file", 5 * PER_CLASS)


def test_hidden_os_files_are_ignored(fpdb_copy, ingestion_params):
    (fpdb_copy / "Images" / ".DS_Store").write_bytes(b"\x00\x01")
    images, report = _read(fpdb_copy, ingestion_params, "fail")
    assert len(images) == 5 * PER_CLASS and report.empty


@pytest.mark.parametrize("mode", ["I;16", "RGBA", "P", "RGB"])
def test_16bit_rgba_palette_rgb_are_converted_not_rejected(fpdb_copy, ingestion_params, mode, caplog):
    target = _first_image(fpdb_copy)
    before, _ = _read(fpdb_copy, ingestion_params, "fail")
    gray = np.asarray(Image.open(target).convert("L"))
    if mode == "I;16":
        Image.fromarray(gray.astype(np.uint16) * 64).save(target)  # 14-bit range in 16-bit
    elif mode == "RGBA":
        rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
        rgba[:, :20, 3] = 0  # a transparent stripe
        Image.fromarray(rgba, "RGBA").save(target)
    else:
        Image.fromarray(gray).convert(mode).save(target)
    assert Image.open(target).mode.startswith(mode[0])
    with caplog.at_level(logging.INFO, logger="fu_kedro.data_sources.validation"):
        images, report = _read(fpdb_copy, ingestion_params, "fail")
    assert report.empty and len(images) == 5 * PER_CLASS
    assert sum(images.info["conversions"].values()) == 1
    assert "source: 1 image(s) converted" in caplog.text
    # the converted image carries the same picture as the 8-bit original
    i = images.meta.index[images.meta["source_file"] == str(target)][0]
    j = before.meta.index[before.meta["source_file"] == str(target)][0]
    r = np.corrcoef(images.images[i].ravel(), before.images[j].ravel())[0, 1]
    assert r > 0.9, r


@pytest.mark.parametrize("size", [(20, 20), (3000, 100)])
def test_absurd_sizes(fpdb_copy, ingestion_params, size):
    bad = _first_image(fpdb_copy)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8)).save(bad)
    _assert_fail_names(fpdb_copy, ingestion_params, bad, "absurd")
    _assert_skip_lists(fpdb_copy, ingestion_params, bad, "absurd", 5 * PER_CLASS - 1)


def test_blank_image(fpdb_copy, ingestion_params):
    bad = _first_image(fpdb_copy)
    Image.fromarray(np.zeros((300, 400), np.uint8)).save(bad)
    _assert_fail_names(fpdb_copy, ingestion_params, bad, "blank image")


def test_african_mixed_rgb_and_gray_accepted_any_csv_name(african_copy, ingestion_params):
    first = sorted(african_copy.glob("*.png"))[0]
    Image.open(first).convert("RGB").save(first)  # make sure the copy is mixed
    n_rgb = sum(Image.open(p).mode == "RGB" for p in african_copy.glob("*.png"))
    assert 0 < n_rgb < 4 * PER_CLASS
    images, report = _read(african_copy, ingestion_params, "fail", fmt="african", required=[])  # no 'other' there
    assert report.empty and len(images) == 4 * PER_CLASS
    assert images.info["conversions"] == {"RGB to grayscale": n_rgb}
    assert images.meta["patient_id"].str.contains("_").all()  # center-qualified patient ids


def test_african_two_csvs_raise(african_copy, ingestion_params):
    shutil.copy(african_copy / "African_test.csv", african_copy / "African_train.csv")
    with pytest.raises(BadInputError, match="exactly one CSV"):
        _read(african_copy, ingestion_params, "fail", fmt="african")


# --- folders layout, built from phantoms -------------------------------------------------

@pytest.fixture
def phantom_folders(tmp_path, small_phantom_sets) -> Path:
    """One sub-folder per class (``Fetal brain/`` style and bare ``other/``) of phantom PNGs."""
    src, _ = small_phantom_sets
    root = tmp_path / "folders"
    names = {"abdomen": "Fetal abdomen", "brain": "Fetal brain", "femur": "femur", "thorax": "thorax", "other": "Other"}
    for label, folder in names.items():
        (root / folder).mkdir(parents=True)
        idx = np.flatnonzero(src.meta["label"] == label)[:3]
        for k in idx:
            # black border + a text-like mark in it, as real exports have
            canvas = np.zeros((100, 120), np.uint8)
            canvas[18:82, 28:92] = src.images[k]
            canvas[3:6, 3:20] = 230
            Image.fromarray(canvas).save(root / folder / f"img{k}.png")
    return root


def test_folders_layout_reads_and_crops_borders(phantom_folders, ingestion_params):
    ingestion_params["image_size"] = 64
    images, report = _read(phantom_folders, ingestion_params, "fail", fmt="folders")
    assert report.empty and len(images) == 15
    assert images.meta["label"].value_counts().to_dict() == {c: 3 for c in ("abdomen", "brain", "femur", "thorax", "other")}
    assert images.images.shape[1:] == (64, 64)
    # after cropping, the content fills the frame: no wide black band on any side
    assert (images.images[:, 16:48, 16:48].mean() > 40)
    assert images.images[:, :, 32].astype(float).mean(axis=0)[2:8].mean() > 5  # top rows are content


def test_folders_empty_class_folder(phantom_folders, ingestion_params):
    empty = phantom_folders / "thorax"
    for f in empty.iterdir():
        f.unlink()
    _assert_fail_names(phantom_folders, ingestion_params, empty, "empty class folder", fmt="folders", required=[])
    _assert_skip_lists(phantom_folders, ingestion_params, empty, "empty class folder", 12, fmt="folders", folder=True,
                       required=[])


def test_folders_unknown_label_folder(phantom_folders, ingestion_params):
    (phantom_folders / "Fetal heart").mkdir()
    bad = phantom_folders / "Fetal heart" / "h.png"
    shutil.copy(next((phantom_folders / "thorax").iterdir()), bad)
    _assert_fail_names(phantom_folders, ingestion_params, bad, "unknown plane label 'Fetal heart'", fmt="folders")
    _assert_skip_lists(phantom_folders, ingestion_params, bad, "unknown plane label", 15, fmt="folders")


def test_folders_duplicate_names_and_non_image(phantom_folders, ingestion_params):
    first = sorted((phantom_folders / "femur").iterdir())[0]
    Image.open(first).convert("RGB").save(first.with_suffix(".jpg"))
    (phantom_folders / "femur" / "readme.md").write_text("x")
    images, report = _read(phantom_folders, ingestion_params, "skip", fmt="folders")
    reasons = dict(zip(report["file"].map(lambda f: Path(f).name), report["reason"]))
    assert "duplicate image name" in reasons[first.name] and "duplicate image name" in reasons[first.with_suffix(".jpg").name]
    assert "not an image file" in reasons["readme.md"]
    assert len(report) == 3 and len(images) == 14
