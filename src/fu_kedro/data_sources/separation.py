"""Domain separation: the zero-shot claim ("no target image in any training step") checked on
the data, not assumed.

Source and target must not share, whatever ``ingestion.on_bad_input`` says:

- the data folder (same resolved path);
- any file (the same resolved path read by both domains, e.g. target folder inside source);
- any picture (identical decoded pixels: ``pixel_hash``, so a renamed copy or a gray image
  saved again as RGB is caught);
- any patient, when both domains number patients the same way (``info['patient_numbering']``:
  two copies of FETAL_PLANES_DB, or two African sets; ``folders`` has no patients).

A violation raises :class:`DomainLeakError` naming a few examples and the count of each kind.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from fu_kedro.datasets import ImageSet

from .validation import BadInputError

EXAMPLES = 3


class DomainLeakError(BadInputError):
    """Source and target overlap: a zero-shot evaluation on them would not be zero-shot."""


def _resolved_files(meta: pd.DataFrame) -> pd.Series:
    files = meta.get("source_file", pd.Series([], dtype=str)).astype(str)
    return files.map(lambda f: "" if f in ("", "phantom", "nan") else str(Path(f).resolve()))


def _examples(pairs: list[tuple[str, str]]) -> str:
    shown = "; ".join(f"{s} (source) = {t} (target)" if s != t else s for s, t in pairs[:EXAMPLES])
    return shown + (" ..." if len(pairs) > EXAMPLES else "")


def find_domain_overlap(source: ImageSet, target: ImageSet) -> list[str]:
    """Every way ``source`` and ``target`` overlap, one line each (count + examples); empty if none."""
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

    numbering = s_info.get("patient_numbering")
    if numbering and numbering == t_info.get("patient_numbering"):
        shared = sorted(set(source.meta["patient_id"].astype(str)) & set(target.meta["patient_id"].astype(str)))
        if shared:
            problems.append(f"{len(shared)} patient id(s) in both domains under the same patient numbering "
                            f"({numbering}), e.g. {', '.join(shared[:EXAMPLES])}" + (" ..." if len(shared) > EXAMPLES else ""))
    return problems


def check_domain_separation(source: ImageSet, target: ImageSet) -> None:
    """Raise :class:`DomainLeakError` if source and target overlap (always fatal)."""
    problems = find_domain_overlap(source, target)
    if problems:
        raise DomainLeakError(
            "domain separation: the target (zero-shot test) data overlap the source (training) data, so a "
            "zero-shot result would not be zero-shot. This stops the run whatever ingestion.on_bad_input says:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + f"\n  (source: {source.info.get('format')} {source.info.get('path') or ''}; "
            f"target: {target.info.get('format')} {target.info.get('path') or ''})"
        )
