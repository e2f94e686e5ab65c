"""Domain separation: the zero-shot claim ("no target image in any training step") checked on
the data, not assumed.

Source and target must not share, whatever ``ingestion.on_bad_input`` says:

- the data folder (same resolved path);
- any file (the same resolved path read by both domains, e.g. target folder inside source);
- any picture (identical decoded pixels: ``pixel_hash``, so a renamed copy or a gray image
  saved again as RGB is caught);
- any near-duplicate picture: a target image whose perceptual hash (``imagehash.phash``,
  256 bits, of the preprocessed image) is within ``ingestion.near_duplicate_max_distance`` bits
  of a source image's, the source image also taken flipped left-right, upside down and both
  (a copy with a few pixels changed, flipped, re-saved as JPEG or slightly resized is caught;
  the threshold's calibration on real source-vs-target pairs: docs/ingestion.md);
- any patient, when both domains number patients the same way (``info['patient_numbering']``:
  two copies of FETAL_PLANES_DB, or two African sets; ``folders`` has no patients).

A violation raises :class:`DomainLeakError` naming a few examples and the count of each kind.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from fu_kedro.datasets import ImageSet

from .validation import BadInputError

logger = logging.getLogger(__name__)

EXAMPLES = 3
PHASH_SIZE = 16  # imagehash.phash(hash_size=16): 256 bits


def perceptual_hashes(images: np.ndarray, flips: bool = False) -> np.ndarray:
    """``(N, V, 4)`` uint64: the 256-bit ``imagehash.phash`` of each image, packed; ``V`` = 4 with
    ``flips`` (as is, flipped left-right, upside down, both), else 1."""
    import imagehash
    from PIL import Image

    out = np.zeros((len(images), 4 if flips else 1, PHASH_SIZE * PHASH_SIZE // 64), np.uint64)
    for i, img in enumerate(images):
        views = (img, img[:, ::-1], img[::-1, :], img[::-1, ::-1]) if flips else (img,)
        for v, view in enumerate(views):
            bits = imagehash.phash(Image.fromarray(np.ascontiguousarray(view)), hash_size=PHASH_SIZE).hash
            out[i, v] = np.packbits(bits.flatten()).view(">u8").astype(np.uint64)
    return out


def nearest_source(source_hashes: np.ndarray, target_hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each target hash: the smallest Hamming distance to any source hash (any flip) and
    the index of that source image."""
    flat = source_hashes.reshape(-1, source_hashes.shape[-1])  # (Ns * V, words)
    best = np.full(len(target_hashes), np.iinfo(np.int64).max, np.int64)
    which = np.zeros(len(target_hashes), np.int64)
    if not len(flat):
        return best, which
    chunk = max(1, 4_000_000 // len(flat))
    for start in range(0, len(target_hashes), chunk):
        t = target_hashes[start:start + chunk, 0]  # (c, words)
        dist = np.bitwise_count(t[:, None, :] ^ flat[None, :, :]).sum(-1, dtype=np.int64)  # (c, Ns * V)
        best[start:start + chunk] = dist.min(1)
        which[start:start + chunk] = dist.argmin(1) // source_hashes.shape[1]
    return best, which


def _near_duplicates(source: ImageSet, target: ImageSet, max_distance: int, known: set) -> list[str]:
    best, which = nearest_source(perceptual_hashes(source.images, flips=True), perceptual_hashes(target.images))
    if len(best):
        logger.info("domain separation: smallest perceptual-hash distance between a target and a source image: "
                    "%d of %d bits (ingestion.near_duplicate_max_distance: %d)", int(best.min()),
                    PHASH_SIZE * PHASH_SIZE, max_distance)
    s_names = source.meta.get("source_file", source.meta["image_id"]).astype(str).to_numpy()
    t_names = target.meta.get("source_file", target.meta["image_id"]).astype(str).to_numpy()
    hits = [(f"{s_names[which[j]]}", f"{t_names[j]} (distance {best[j]})") for j in np.flatnonzero(best <= max_distance)
            if t_names[j] not in known]
    if not hits:
        return []
    return [f"{len(hits)} target image(s) nearly identical to a source image (perceptual hash within {max_distance} of "
            f"{PHASH_SIZE * PHASH_SIZE} bits, flips included; ingestion.near_duplicate_max_distance), e.g. "
            + _examples(sorted(hits))]


class DomainLeakError(BadInputError):
    """Source and target overlap: a zero-shot evaluation on them would not be zero-shot."""


def _resolved_files(meta: pd.DataFrame) -> pd.Series:
    files = meta.get("source_file", pd.Series([], dtype=str)).astype(str)
    return files.map(lambda f: "" if f in ("", "phantom", "nan") else str(Path(f).resolve()))


def _examples(pairs: list[tuple[str, str]]) -> str:
    shown = "; ".join(f"{s} (source) = {t} (target)" if s != t else s for s, t in pairs[:EXAMPLES])
    return shown + (" ..." if len(pairs) > EXAMPLES else "")


def find_domain_overlap(source: ImageSet, target: ImageSet, near_duplicate_max_distance: int | None) -> list[str]:
    """Every way ``source`` and ``target`` overlap, one line each (count + examples); empty if none.

    ``near_duplicate_max_distance``: the perceptual-hash threshold (bits of 256); None leaves
    near duplicates unchecked (said in a WARNING)."""
    problems = []
    s_info, t_info = source.info or {}, target.info or {}
    s_path, t_path = s_info.get("path"), t_info.get("path")
    if s_path and t_path and Path(s_path).resolve() == Path(t_path).resolve():
        problems.append(f"source_path and target_path are the same folder: {Path(s_path).resolve()}")

    s_files, t_files = _resolved_files(source.meta), _resolved_files(target.meta)
    shared_files = sorted((set(s_files) & set(t_files)) - {""})
    if shared_files:
        problems.append(f"{len(shared_files)} file(s) read as both source and target, e.g. "
                        + _examples([(f, f) for f in shared_files]))

    if "pixel_hash" in source.meta and "pixel_hash" in target.meta:
        s_by_hash = dict(zip(source.meta["pixel_hash"], source.meta.get("source_file", source.meta["image_id"])))
        pairs = [(s_by_hash[h], f) for h, f in zip(target.meta["pixel_hash"],
                                                   target.meta.get("source_file", target.meta["image_id"]))
                 if h in s_by_hash and str(f) not in shared_files]
        if pairs:
            problems.append(f"{len(pairs)} target image(s) with the same decoded pixels as a source image, e.g. "
                            + _examples(sorted(pairs)))
        known = set(shared_files) | {str(f) for _, f in pairs}  # already named: not again as near duplicates
    else:
        known = set(shared_files)
    if near_duplicate_max_distance is None:
        logger.warning("domain separation: near duplicates (perceptual hash) not checked: "
                       "ingestion.near_duplicate_max_distance is null")
    else:
        limit = near_duplicate_max_distance
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit < PHASH_SIZE * PHASH_SIZE:
            raise ValueError(f"ingestion.near_duplicate_max_distance must be a whole number of bits in "
                             f"[0, {PHASH_SIZE * PHASH_SIZE}) or null, got {limit!r}")
        problems += _near_duplicates(source, target, limit, known)

    numbering = s_info.get("patient_numbering")
    if numbering and numbering == t_info.get("patient_numbering"):
        shared = sorted(set(source.meta["patient_id"].astype(str)) & set(target.meta["patient_id"].astype(str)))
        if shared:
            problems.append(f"{len(shared)} patient id(s) in both domains under the same patient numbering "
                            f"({numbering}), e.g. {', '.join(shared[:EXAMPLES])}" + (" ..." if len(shared) > EXAMPLES else ""))
    return problems


def check_domain_separation(source: ImageSet, target: ImageSet, near_duplicate_max_distance: int | None) -> None:
    """Raise :class:`DomainLeakError` if source and target overlap (always fatal)."""
    problems = find_domain_overlap(source, target, near_duplicate_max_distance)
    if problems:
        raise DomainLeakError(
            "domain separation: the target (zero-shot test) data overlap the source (training) data, so a "
            "zero-shot result would not be zero-shot. This stops the run whatever ingestion.on_bad_input says:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + f"\n  (source: {source.info.get('format')} {source.info.get('path') or ''}; "
            f"target: {target.info.get('format')} {target.info.get('path') or ''})"
        )
