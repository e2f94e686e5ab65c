"""The offline phantom generator: determinism, layout of the sets, class cues, domain shift."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from fu_kedro.data_sources import CLASSES, generate_phantoms
from fu_kedro.data_sources.phantom import DEFAULT_TARGET_CENTERS


def test_same_seed_same_pixels_other_seed_other_pixels():
    a = generate_phantoms("source", 3, 48, seed=5)
    b = generate_phantoms("source", 3, 48, seed=5)
    c = generate_phantoms("source", 3, 48, seed=6)
    assert np.array_equal(a.images, b.images)
    pd.testing.assert_frame_equal(a.meta, b.meta)
    assert not np.array_equal(a.images, c.images)


def test_source_layout(small_phantom_sets):
    src, _ = small_phantom_sets
    assert src.images.shape == (12 * 5, 64, 64) and src.images.dtype == np.uint8
    assert src.meta["label"].value_counts().to_dict() == {c: 12 for c in CLASSES}
    assert set(src.meta["domain"]) == {"source"} and set(src.meta["source_file"]) == {"phantom"}
    # several images per patient, and one machine per patient
    assert src.meta["patient_id"].nunique() < len(src) / 2
    assert (src.meta.groupby("patient_id")["machine"].nunique() == 1).all()
    assert src.meta["machine"].nunique() >= 2


def test_target_has_five_centers_four_classes_and_missing_classes(small_phantom_sets):
    _, tgt = small_phantom_sets
    assert tgt.meta["center"].nunique() == 5
    assert set(tgt.meta["label"]) == {"abdomen", "brain", "femur", "thorax"}
    assert tgt.meta["label"].value_counts().to_dict() == {c: 8 for c in ("abdomen", "brain", "femur", "thorax")}
    for center in DEFAULT_TARGET_CENTERS:
        have = set(tgt.meta.loc[tgt.meta["center"] == center["name"], "label"])
        assert not have & set(center["missing"]), center["name"]
    assert any(c["missing"] for c in DEFAULT_TARGET_CENTERS)


def test_images_look_like_ultrasound_sector(small_phantom_sets):
    src, _ = small_phantom_sets
    mean = src.images.astype(float).mean(axis=0)
    # bottom corners are outside the fan (black), the centre is tissue
    assert mean[-2, 1] < 10 and mean[-2, -6] < 10
    assert mean[32, 32] > 40


def test_unknown_domain_is_refused():
    with pytest.raises(ValueError, match="'source' or 'target'"):
        generate_phantoms("train", 2, 32, seed=0)


def _pixels(images, px):
    return np.stack([np.asarray(Image.fromarray(i).resize((px, px), Image.Resampling.BOX)) for i in images]
                    ).reshape(len(images), -1) / 255.0


def test_class_cues_survive_32px_and_target_is_a_real_domain_shift():
    src = generate_phantoms("source", 60, 64, seed=1)
    tgt = generate_phantoms("target", 30, 64, seed=1)
    y = src.meta["label"].to_numpy()
    # patient-level hold-out, as the pipeline does
    patients = src.meta["patient_id"].unique()
    held = src.meta["patient_id"].isin(patients[::4]).to_numpy()
    clf = make_pipeline(PCA(30, random_state=0), LogisticRegression(max_iter=2000, C=0.1))
    clf.fit(_pixels(src.images[~held], 32), y[~held])
    source_acc = (clf.predict(_pixels(src.images[held], 32)) == y[held]).mean()
    target_acc = (clf.predict(_pixels(tgt.images, 32)) == tgt.meta["label"].to_numpy()).mean()
    assert source_acc >= 0.85, source_acc
    # clearly above chance (0.25 over the four target classes) but clearly below the source
    assert 0.3 < target_acc < source_acc - 0.1, (source_acc, target_acc)


def test_conf_phantom_settings_equal_the_generator_defaults(ingestion_params):
    # others' tests call generate_phantoms() without settings and expect the pipeline's phantoms
    from fu_kedro.data_sources.phantom import DEFAULT_SOURCE_MACHINES

    assert ingestion_params["phantom"]["source"]["settings"] == DEFAULT_SOURCE_MACHINES
    assert ingestion_params["phantom"]["target"]["settings"] == DEFAULT_TARGET_CENTERS


def test_source_class_proportions_follow_fetal_planes_db():
    """conf/base gives the phantom source FETAL_PLANES_DB's training-split shares (Other 42 %, brain 26 %,
    thorax 17 %, femur 8 %, abdomen 6 %), so a balanced subset of it is smaller than all of it."""
    from conftest import base_params

    from fu_kedro.data_sources import generate_phantoms

    shares = base_params("ingestion")["phantom"]["source"]["class_proportions"]
    src = generate_phantoms("source", n_per_class=20, image_size=16, seed=0, class_proportions=shares)
    counts = src.meta["label"].value_counts()
    assert counts.to_dict() == {"other": 42, "brain": 26, "thorax": 17, "femur": 9, "abdomen": 6}  # of 100
    with pytest.raises(ValueError, match="missing \\['other'\\]"):
        generate_phantoms("source", n_per_class=2, image_size=16, seed=0, class_proportions={"brain": 1, "femur": 1,
                                                                                             "thorax": 1, "abdomen": 1})
