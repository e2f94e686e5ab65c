"""The tiny base's offline CLIP tokenizer, loaded from the committed vocab.json + merges.txt.

The two files were written once (issue #16) from the BPE vocabulary and merges that
``fu_kedro.models.diffusion.build_offline_tokenizer`` used to build in code (byte alphabet +
a merge chain per caption word). The expected ids below were printed by that old code
(commit cb37845, ``build_offline_tokenizer()(caption).input_ids``) before it was deleted: the
committed files must give the same ids, so the tiny base (its text-encoder embedding table,
its prompts) is unchanged.
"""
from __future__ import annotations

import tomllib

import pytest
from conftest import PROJECT_ROOT, base_params

from fu_kedro.models.diffusion import TINY_CONFIG, TOKENIZER_DIR, build_offline_tokenizer, build_pipeline_from_config

BOS, EOS = 651, 652
# from the old in-code BPE builder (see the module docstring), unpadded
OLD_IDS = {
    "a photo of fetal abdomen": [651, 320, 540, 541, 536, 517, 652],
    "a photo of fetal brain": [651, 320, 540, 541, 536, 521, 652],
    "a photo of fetal femur": [651, 320, 540, 541, 536, 525, 652],
    "a photo of fetal thorax": [651, 320, 540, 541, 536, 530, 652],
    "a photo of fetal other": [651, 320, 540, 541, 536, 533, 652],
    "": [651, 652],  # the empty caption (caption dropout, classifier-free guidance)
    "a photo of fetal kidney": [651, 320, 540, 541, 536, 74, 72, 67, 77, 68, 344, 652],  # unknown word: byte pieces
    "zebra": [651, 89, 68, 518, 320, 652],
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_offline_tokenizer()


def test_the_captions_the_project_uses_get_the_old_token_ids(tokenizer):
    template = base_params("ingestion")["caption_template"]
    captions = [template.format(plane=c) for c in base_params("classes")]
    assert set(captions) <= set(OLD_IDS)  # every class caption is pinned above
    for caption, ids in OLD_IDS.items():
        assert tokenizer(caption).input_ids == ids, caption
        padded = tokenizer(caption, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
        assert padded.input_ids == ids + [EOS] * (77 - len(ids)), caption


def test_vocabulary_and_special_tokens(tokenizer):
    assert len(tokenizer) == 653 and tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS, EOS, EOS)
    assert tokenizer.unk_token == "<|endoftext|>"
    # the caption words are single tokens (the merges spell them whole)
    for word in ("abdomen", "brain", "femur", "thorax", "other", "fetal", "photo", "of", "a"):
        assert len(tokenizer(word).input_ids) == 3, word


def test_tiny_text_encoder_config_matches_the_tokenizer(tokenizer):
    config = build_pipeline_from_config(TINY_CONFIG, 32, seed=0).text_encoder.config
    assert config.vocab_size == len(tokenizer) == 653
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (BOS, EOS, EOS)
    assert config.max_position_embeddings == 77 and config.hidden_size == 64 and config.num_attention_heads == 4


def test_the_files_ship_as_package_data():
    assert (TOKENIZER_DIR / "vocab.json").is_file() and (TOKENIZER_DIR / "merges.txt").is_file()
    setuptools = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(setuptools["package-data"]["fu_kedro.models"]) >= {"tokenizer/vocab.json", "tokenizer/merges.txt"}
