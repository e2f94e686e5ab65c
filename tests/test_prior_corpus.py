"""The broad prior corpus the tiny base is trained on: made from its own style ranges only,
never from the target centers' settings; breadth controls its variety; same seed, same pixels."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import base_params

from fu_kedro.data_sources.phantom import DEFAULT_TARGET_CENTERS
from fu_kedro.data_sources.prior_corpus import STYLE_KEYS, make_prior_corpus
from fu_kedro.pipelines.base_training.pipeline import create_pipeline, create_pipeline_with_source
from fu_kedro.pipelines.base_training.nodes import base_training_corpus as _corpus
from fu_kedro.pipelines.base_training.nodes import make_prior_corpus as prior_corpus_node
from fu_kedro.schema import ParameterError


def base_training_corpus(source, prior, train_on, source_repeats=1):
    """The node with its two parameters as arguments."""
    return _corpus(prior, source, base_params("base_training") | {"train_on": train_on, "source_repeats": source_repeats})


CLASSES = base_params("classes")  # the top-level class list


@pytest.fixture
def prior_params() -> dict:
    prior = base_params("base_training")["prior"]
    return prior | {"n_per_class": 6, "image_size": 64}


def test_the_corpus_node_reads_no_target_parameter_or_data():
    for pipeline in (create_pipeline(), create_pipeline_with_source()):
        node = next(n for n in pipeline.nodes if n.name == "make_prior_corpus_node")
        assert node.inputs == ["params:base_training.prior", "params:classes", "params:seed"]
        assert not any("target" in name or "ingestion" in name for name in node.inputs)
    # the base is trained on the corpus node's output only; the source comes in through base_training_corpus
    assert not any("target" in name for n in create_pipeline_with_source().nodes for name in n.inputs)


def test_no_corpus_image_is_rendered_with_a_target_centers_style(prior_params):
    ingestion = base_params("ingestion")
    centers = ingestion["phantom"]["target"]["settings"] + DEFAULT_TARGET_CENTERS
    corpus = make_prior_corpus(prior_params | {"n_per_class": 40}, CLASSES, seed=42)
    styles = corpus.meta[list(STYLE_KEYS)].to_numpy(float)
    for center in centers:
        target = np.array([float(center[k]) for k in STYLE_KEYS])
        closest = np.abs(styles - target).max(axis=1).min()
        assert closest > 1e-3, f"a prior image uses {center['name']}'s style"
    assert set(corpus.meta["domain"]) == {"prior"} and not corpus.meta["image_id"].str.startswith("tgt").any()


def test_same_seed_same_pixels_and_breadth_sets_the_variety(prior_params):
    a, b = make_prior_corpus(prior_params, CLASSES, 7), make_prior_corpus(prior_params, CLASSES, 7)
    assert np.array_equal(a.images, b.images) and a.meta.equals(b.meta)
    assert len(a) == 6 * len(CLASSES)
    narrow = make_prior_corpus(prior_params | {"breadth": 0.0}, CLASSES, 7)
    assert narrow.meta[list(STYLE_KEYS)].nunique().max() == 1  # one style: the ranges' midpoints
    wide_spread = a.meta[list(STYLE_KEYS)].std()
    half = make_prior_corpus(prior_params | {"breadth": 0.5}, CLASSES, 7).meta[list(STYLE_KEYS)].std()
    assert (half < wide_spread).all()


def test_bad_prior_settings_are_named(prior_params):
    """The node checks its block against the schema before drawing anything."""
    with pytest.raises(ParameterError, match=r"base_training\.prior\.styles\.speckle: missing in base_training\.prior\.styles"):
        prior_corpus_node(prior_params | {"styles": {"gain": [0.5, 1.0]}}, CLASSES, 0)
    with pytest.raises(ParameterError, match=r"base_training\.prior\.n_per_clas: unknown key in base_training\.prior"):
        prior_corpus_node(prior_params | {"n_per_clas": 3}, CLASSES, 0)
    with pytest.raises(ParameterError, match=r"base_training\.prior\.classes: unknown key"):
        prior_corpus_node(prior_params | {"classes": ["brain"]}, CLASSES, 0)
    with pytest.raises(ParameterError, match=r"base_training\.prior\.breadth: 2 in base_training\.prior: .*less than or equal to 1"):
        prior_corpus_node(prior_params | {"breadth": 2}, CLASSES, 0)
    node = prior_corpus_node(prior_params, CLASSES, 7)  # a good block: the library's corpus, unchanged
    assert np.array_equal(node.images, make_prior_corpus(prior_params, CLASSES, 7).images)


def test_the_base_corpus_is_prior_source_or_both_never_target(prior_params, small_phantom_sets):
    source, target = small_phantom_sets
    source = source.select(np.arange(len(source)))
    source.meta["split"] = np.where(np.arange(len(source)) % 5 == 0, "val", "train")
    prior = make_prior_corpus(prior_params, CLASSES, 1)
    alone = base_training_corpus(source, prior, "prior")
    assert np.array_equal(alone.images, prior.images) and alone.meta.equals(prior.meta) and alone.info["train_on"] == "prior"
    only_source = base_training_corpus(source, prior, "source")
    assert set(only_source.meta["split"]) == {"train"}
    both = base_training_corpus(source, prior, "prior+source")
    assert len(both) == len(prior) + len(only_source)
    assert not set(both.meta["image_id"]) & set(target.meta["image_id"])
    with pytest.raises(ParameterError, match="base_training.train_on: .target. in base_training; allowed values: .prior., .source. or .prior.source."):
        base_training_corpus(source, prior, "target")
    with pytest.raises(ValueError, match="prior corpus, but it is empty"):
        base_training_corpus(source, make_prior_corpus(prior_params | {"n_per_class": 0}, CLASSES, 1), "prior")


def test_source_repeats_and_the_priors_own_caption(prior_params, small_phantom_sets):
    """kohya-style repeats weight the few real images against the prior; a caption of the
    prior's own tells the two looks apart; neither changes anything when left at its default."""
    from fu_kedro.pipelines.base_training.nodes import _captions

    source, _ = small_phantom_sets
    source = source.select(np.arange(len(source)))
    source.meta["split"] = np.where(np.arange(len(source)) % 5 == 0, "val", "train")
    n_train = int((source.meta["split"] == "train").sum())
    plain = make_prior_corpus(prior_params, CLASSES, 1)
    assert "caption" not in plain.meta and "caption_template" not in plain.info
    own = make_prior_corpus(prior_params | {"caption_template": "a phantom of fetal {plane}"}, CLASSES, 1)
    assert np.array_equal(own.images, plain.images)  # same pixels, only the caption differs
    both = base_training_corpus(source, own, "prior+source", source_repeats=3)
    assert len(both) == len(own) + 3 * n_train
    assert (both.meta["domain"] != "prior").sum() == 3 * n_train
    caps = _captions(both, "a photo of fetal {plane}")
    for cap, domain, label in zip(caps, both.meta["domain"], both.meta["label"]):
        word = "phantom" if domain == "prior" else "photo"
        assert cap == f"a {word} of fetal {label}"
    once = base_training_corpus(source, plain, "prior+source")
    assert _captions(once, "a photo of fetal {plane}") == [f"a photo of fetal {x}" for x in once.meta["label"]]
    for bad in (0, 1.5, True):
        with pytest.raises(ParameterError, match=r"base_training\.source_repeats: .* in base_training: Input should be"):
            base_training_corpus(source, plain, "prior+source", source_repeats=bad)
