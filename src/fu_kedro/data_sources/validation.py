"""Checks on real input: open every image, decide what is bad, apply the ``on_bad_input`` policy.

Bad (skipped under ``skip``, named in the error under ``fail``): corrupt or truncated
files (PNG chunk checksums are verified before decoding), files that are not images,
files listed in a CSV but missing, image files present but not listed, unknown plane
labels, duplicate image names, CSV rows with a blank patient number or centre or an image
name that leaves the dataset folder, empty or unreadable class folders, absurd sizes, blank
images, multi-frame files (a TIFF stack or an animated PNG/GIF: a clip, not one image), and
entries that cannot be read as image files (:func:`file_problem`: a file name that is not
valid UTF-8, a broken or looping symbolic link, a folder named like an image, a file without
read permission). A file name that is not UTF-8 is shown with its undecodable bytes as
``\\xNN`` (:func:`shown_path`), so the report, the log and the error can all hold it.

Converted with a logged note (never rejected): RGB (the African set is mixed grayscale/
RGB), RGBA/LA (composited on black), palette, 16-bit (scaled by the image's own maximum)
and any other PIL mode that converts to 8-bit grayscale; an image whose content is of another
format than its extension says (a TIFF or JPEG saved as ``.png``) is read by its content, with
a note.

Always an error, whatever the policy: structural problems that leave nothing to read (no
CSV, a CSV with the wrong separator or missing columns or no data rows, a missing folder,
no usable image at all), a required class (source: every class of the top-level
``classes``; target: ``ingestion.required_classes.target``) without any usable image,
and a misspelt ``on_bad_input`` (checked before anything is read).
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
REPORT_COLUMNS = ["file", "reason", "domain"]
POLICIES = ("fail", "skip")


def check_policy(policy) -> str:
    """``ingestion.on_bad_input`` is ``fail`` or ``skip``; called before any image is read."""
    if policy not in POLICIES:
        raise BadInputError(f"ingestion.on_bad_input must be one of {POLICIES}, got {policy!r}")
    return policy


class BadInputError(ValueError):
    """Input that cannot be used as it is; the message names the file(s) and the reason."""


class BadImage(Exception):
    """One image file that cannot be used (the message is the reason)."""


def shown_text(text: str) -> str:
    """``text`` (a path or a message holding one) as text that any log, CSV or JSON can hold:
    bytes of a file name that are not UTF-8 (Python keeps them as lone surrogates) become ``\\xNN``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def shown_path(path) -> str:
    """A path as :func:`shown_text` shows it (the bytes of ``os.fsencode(path)``, undecodable ones as ``\\xNN``)."""
    return shown_text(os.fspath(path))


def is_utf8_name(path) -> bool:
    """Whether every byte of ``path`` decodes as UTF-8 (the CSVs, the report and MLflow need text)."""
    try:
        os.fspath(path).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


NOT_UTF8 = "the file name is not valid UTF-8 (its undecodable bytes are shown as \\xNN); rename it to UTF-8 text"


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as an image file, or None (a readable regular file, or a link
    to one; a path that does not exist at all is the caller's "missing").

    The reasons: a name that is not UTF-8, a broken symbolic link (names its target), a symbolic
    link loop, a folder (or a link to one) named like an image, something that is not a regular
    file (a pipe, a device), no permission to read it or to enter a folder above it.
    """
    if not is_utf8_name(path):
        return NOT_UTF8
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"broken symbolic link: it points to {shown_path(os.readlink(path))}, which does not exist"
        return None
    except PermissionError:
        return "cannot be read: permission denied (on the file or a folder above it)"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop: the link leads (through links) back to itself"
        return f"cannot be read: {exc.strerror or exc}"
    if stat.S_ISDIR(st.st_mode):
        link = f" (a symbolic link to {shown_path(os.readlink(path))})" if os.path.islink(path) else ""
        return f"a folder{link} named like an image file, not an image"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a pipe, socket or device), not an image"
    if not os.access(path, os.R_OK):
        return "cannot be read: permission denied"
    return None


@dataclass
class IssueLog:
    """Bad items of one domain (file + reason) and notes on converted images.

    ``folder=True`` marks an item that is a folder, not an image (an empty class folder):
    it is reported like the others but not counted among the images read.
    """

    domain: str
    issues: list[dict] = field(default_factory=list)
    conversions: Counter = field(default_factory=Counter)
    n_folder_items: int = 0

    def add(self, file, reason: str, folder: bool = False) -> None:
        self.issues.append({"file": shown_path(file), "reason": shown_text(reason), "domain": self.domain})
        self.n_folder_items += int(folder)

    def note_conversion(self, what: str) -> None:
        self.conversions[what] += 1

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.issues, columns=REPORT_COLUMNS)

    def enforce(self, policy: str) -> None:
        """Raise under ``fail`` if anything is bad; under ``skip`` log each skipped item."""
        check_policy(policy)
        for what, n in sorted(self.conversions.items()):
            logger.info("%s: %d image(s) converted: %s", self.domain, n, what)
        if not self.issues:
            return
        if policy == "fail":
            lines = [f"  {i['file']}: {i['reason']}" for i in self.issues[:20]]
            more = f"\n  ... and {len(self.issues) - 20} more" if len(self.issues) > 20 else ""
            raise BadInputError(
                f"{len(self.issues)} bad input item(s) in the {self.domain} data "
                f"(set ingestion.on_bad_input=skip to quarantine them instead):\n"
                + "\n".join(lines) + more
            )
        for i in self.issues:
            logger.warning("%s: skipped %s: %s", self.domain, i["file"], i["reason"])


def open_grayscale(path: Path, limits: dict, log: IssueLog) -> np.ndarray:
    """Decode ``path`` fully and return it as 8-bit grayscale ``(H, W)``.

    Raises ``BadImage`` with the reason for unreadable (:func:`file_problem`), undecodable,
    corrupt (failed integrity check), truncated, multi-frame, absurdly sized or blank images;
    records a conversion note for non-8-bit-grayscale modes and for content of another format
    than the extension says.
    """
    problem = file_problem(path)
    if problem:
        raise BadImage(problem)
    try:
        with Image.open(path) as im:
            w, h = im.size
            _check_size(w, h, limits)
            _check_single_frame(im)
            _note_format(path, im, log)
            # PIL's decoder does not check PNG chunk CRCs, so a flipped byte inside IDAT can
            # decode to silently different pixels; verify() checks every chunk's CRC first.
            im.verify()
    except BadImage:
        raise
    except PermissionError:
        raise BadImage("cannot be read: permission denied") from None
    except UnidentifiedImageError:
        raise BadImage("not a decodable image (PIL cannot identify it)") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(f"absurd size: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImage(f"corrupt or truncated image (integrity check failed: {exc})") from None
    try:
        with Image.open(path) as im:  # verify() leaves the file unusable: open it again
            im.load()  # decodes every byte: truncated files fail here, not later
            arr = _to_gray8(im, log)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImage(f"corrupt or truncated image: {exc}") from None
    if int(arr.max()) - int(arr.min()) < int(limits["min_dynamic_range"]):
        raise BadImage(f"blank image: grey levels {arr.min()}..{arr.max()}, no ultrasound content")
    return arr


# what PIL calls the formats of IMAGE_SUFFIXES
SUFFIX_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}


def _check_single_frame(im: Image.Image) -> None:
    n = int(getattr(im, "n_frames", 1) or 1)
    if n > 1:
        raise BadImage(f"multi-frame {im.format} ({n} frames: a clip or stack, not one image); "
                       "export the frame to use as its own file")


def _note_format(path: Path, im: Image.Image, log: IssueLog) -> None:
    expected = SUFFIX_FORMATS.get(Path(path).suffix.lower())
    if expected and im.format and im.format != expected:
        log.note_conversion(f"{im.format} content in a {Path(path).suffix.lower()} file, read as {im.format}")


def _check_size(w: int, h: int, limits: dict) -> None:
    lo, hi = int(limits["min_side"]), int(limits["max_side"])
    if min(w, h) < lo or max(w, h) > hi:
        raise BadImage(f"absurd size {w}x{h} px (allowed sides {lo}..{hi}, ingestion.limits)")
    aspect = max(w, h) / min(w, h)
    if aspect > float(limits["max_aspect"]):
        raise BadImage(f"absurd aspect ratio {aspect:.1f} of {w}x{h} px (max {limits['max_aspect']})")


def _to_gray8(im: Image.Image, log: IssueLog) -> np.ndarray:
    mode = im.mode
    if mode == "L":
        return np.asarray(im, dtype=np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit exports often use only 10-12 bits: scale by the image's own maximum so
        # the picture is not nearly black
        a = np.asarray(im).astype(np.float64)
        top = a.max()
        log.note_conversion(f"{mode} (high bit depth) scaled to 8-bit by its maximum")
        return np.zeros(a.shape, np.uint8) if top <= 0 else np.clip(a * 255.0 / top + 0.5, 0, 255).astype(np.uint8)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        log.note_conversion("palette to grayscale")
    if im.mode in ("RGBA", "LA", "PA"):
        # transparent pixels become black: they are outside the ultrasound content anyway
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(black, rgba).convert("RGB")
        log.note_conversion(f"{mode} with alpha composited on black, to grayscale")
    elif mode != "P":
        log.note_conversion(f"{mode} to grayscale")
    return np.asarray(im.convert("L"), dtype=np.uint8)
