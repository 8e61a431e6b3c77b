"""Readers that turn real public-domain texts shipped by Debian into benchmark documents.

A benchmark needs several sources with distinct styles whose full contents we know, so
that attribution to a source can be checked. Debian packages three that are small,
free and installable offline from the package mirror:

* ``fortunes`` -- ``/usr/share/games/fortunes/*``: quips, one per block, blocks separated by
  a line holding a single ``%``.
* ``dict-devil`` -- ``/usr/share/dictd/devil.dict.dz``: Bierce's *Devil's Dictionary*.
* ``dict-foldoc`` -- ``/usr/share/dictd/foldoc.dict.dz``: the Free On-line Dictionary of
  Computing.

The ``.dict.dz`` files are gzip (dictzip) streams of the entries one after another, after a
header written by ``dictfmt`` (``00-database-*`` meta entries: url, short name, info) and
followed by a ``00-database-alphabet`` line. The entry boundaries below were found by
inspecting the files and checked against the byte offsets in their ``.index`` files:
the Devil rule finds all 999 entries exactly; the FOLDOC rule finds 12,013 of 12,014 (one
entry whose predecessor ends without a blank line stays glued to it) plus one false start
(the "Acknowledgements" page inside the info header).

Every reader returns ``list[dict]`` with keys ``id`` (stable: derived from the file and the
entry's position), ``text`` and ``source``.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable
from pathlib import Path

from bgotrace.errors import InputError

FORTUNE_DIR = Path("/usr/share/games/fortunes")
DEVIL_PATH = Path("/usr/share/dictd/devil.dict.dz")
FOLDOC_PATH = Path("/usr/share/dictd/foldoc.dict.dz")

_OVERSTRIKE = re.compile(r".\x08")  # "_\bX" (underline) or "X\bX" (bold) in old fortunes
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # bells, stray backspaces, C1 bytes
# "ABASEMENT, n.", "CUI BONO?", "R.I.P.", "W (double U)", "I is the first letter"; a lone
# capital is a headword only in those forms, since "A ..." or "I ..." may start prose.
_DEVIL_HEADWORD = re.compile(r"^(?:[A-Z][A-Z'\-]+[ ,.?]|[A-Z](?: is | in | \(|[,.]))")
_FOLDOC_DATE = re.compile(r"^\s+\(\d{4}-\d{2}-\d{2}\)\s*$")  # "   (2014-11-27)" ends entries


def _require(path: Path, package: str | None) -> None:
    """Raise a one-line error that names the missing file and how to get it."""
    if path.exists():
        return
    fix = (
        f"install it with `apt-get install -y {package}`"
        if package
        else "check the path or create it"
    )
    raise InputError(f"Text source {path} does not exist: {fix}, or pass the path to a copy.")


def _clean(text: str) -> str:
    """Normalise line ends, drop terminal overstrikes and control bytes, trim blank space."""
    text = _CONTROL.sub("", _OVERSTRIKE.sub("", text.replace("\r\n", "\n")))
    return text.strip()


def _doc(doc_id: str, text: str, source: str) -> dict[str, str]:
    return {"id": doc_id, "text": text, "source": source}


# --------------------------------------------------------------------------- fortunes


def split_fortunes(text: str) -> list[str]:
    """Split a fortune file into its quips (blocks between lines that are exactly ``%``)."""
    blocks: list[list[str]] = [[]]
    for line in text.split("\n"):
        if line.rstrip("\r") == "%":
            blocks.append([])
        else:
            blocks[-1].append(line)
    cleaned = (_clean("\n".join(block)) for block in blocks)
    return [block for block in cleaned if block]


def _fortune_files(path: Path) -> list[Path]:
    """The fortune text files of a directory: regular files, not ``.dat`` indexes or links."""
    if path.is_file():
        return [path]
    return sorted(
        p for p in path.iterdir() if p.is_file() and not p.is_symlink() and p.suffix != ".dat"
    )


def read_fortunes(path: str | Path = FORTUNE_DIR, *, source: str = "fortunes") -> list[dict]:
    """Read a fortune file, or every fortune file in a directory, one document per quip."""
    path = Path(path)
    _require(path, "fortunes")
    docs = []
    for file in _fortune_files(path):
        text = file.read_text(encoding="utf-8", errors="replace")
        for k, quip in enumerate(split_fortunes(text)):
            docs.append(_doc(f"{source}/{file.name}/{k:04d}", quip, source))
    return docs


# --------------------------------------------------------------------------- dictd


def _read_maybe_gzip(path: Path) -> str:
    """Text of a ``.dict.dz`` (gzip) or an uncompressed ``.dict`` file."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def _blank(lines: list[str], i: int) -> bool:
    return i < 0 or i >= len(lines) or not lines[i].strip()


def _indented(line: str) -> bool:
    return line[:1].isspace()


def _devil_start(lines: list[str], i: int) -> bool:
    """A Devil entry starts after a blank line with an upper-case headword at column 0.

    Body paragraphs and quoted verse are indented, so only headwords start at column 0.
    """
    return _blank(lines, i - 1) and bool(_DEVIL_HEADWORD.match(lines[i]))


def _foldoc_start(lines: list[str], i: int) -> bool:
    """A FOLDOC entry: unindented headword lines, a blank line, then an indented body.

    The entry before ends with a blank line or, sometimes, directly with its date line.
    Headword blocks never contain URLs (wrapped ``(http://...)`` tails look like headwords)
    nor ``%%%`` (dictfmt's alias syntax, seen only in the header).
    """
    if _blank(lines, i) or _indented(lines[i]):
        return False
    if not (_blank(lines, i - 1) or _FOLDOC_DATE.match(lines[i - 1])):
        return False
    j = i
    while not _blank(lines, j):
        if _indented(lines[j]) or "://" in lines[j] or "%%%" in lines[j]:
            return False
        j += 1
    return not _blank(lines, j + 1) and _indented(lines[j + 1])


DICTD_STYLES: dict[str, Callable[[list[str], int], bool]] = {
    "devil": _devil_start,
    "foldoc": _foldoc_start,
}


def _is_alphabet_line(line: str) -> bool:
    """dictfmt's closing ``00-database-alphabet`` entry: the characters used, sorted."""
    chars = line.strip()
    return len(chars) >= 10 and all(a < b for a, b in zip(chars, chars[1:], strict=False))


def split_dictd(text: str, style: str) -> list[str]:
    """Split the text of a dictd database into entry texts, dropping the header and trailer.

    Everything before the first entry start is the ``dictfmt`` header (meta entries and the
    database's info page) and is skipped, as is the trailing alphabet line.
    """
    if style not in DICTD_STYLES:
        raise InputError(f"Unknown dictd style {style!r}: use one of {sorted(DICTD_STYLES)}.")
    is_start = DICTD_STYLES[style]
    lines = text.split("\n")
    while lines and (not lines[-1].strip() or _is_alphabet_line(lines[-1])):
        lines.pop()
    starts = [i for i in range(len(lines)) if is_start(lines, i)]
    bounds = zip(starts, [*starts[1:], len(lines)], strict=True)
    entries = (_clean("\n".join(lines[a:b])) for a, b in bounds)
    return [e for e in entries if e and not e.startswith("00-database")]


def read_dictd(
    path: str | Path, *, style: str, source: str, package: str | None = None
) -> list[dict]:
    """Read a dictd ``.dict.dz`` file into one document per dictionary entry."""
    path = Path(path)
    _require(path, package)
    entries = split_dictd(_read_maybe_gzip(path), style)
    return [_doc(f"{source}/{k:05d}", entry, source) for k, entry in enumerate(entries)]


def read_devil(path: str | Path = DEVIL_PATH, *, source: str = "devil") -> list[dict]:
    """Bierce's *Devil's Dictionary* (Debian package ``dict-devil``), one document per entry."""
    return read_dictd(path, style="devil", source=source, package="dict-devil")


def read_foldoc(path: str | Path = FOLDOC_PATH, *, source: str = "foldoc") -> list[dict]:
    """FOLDOC (Debian package ``dict-foldoc``), one document per entry."""
    return read_dictd(path, style="foldoc", source=source, package="dict-foldoc")


# --------------------------------------------------------------------------- plain text


def _pack_paragraphs(text: str, max_chars: int) -> list[str]:
    """Group consecutive paragraphs into chunks of at most ``max_chars`` (a longer paragraph
    is kept whole), so that books become documents of a trainable size."""
    chunks: list[str] = []
    current = ""
    for para in (p.strip() for p in re.split(r"\n\s*\n", text)):
        if not para:
            continue
        if current and len(current) + 2 + len(para) > max_chars:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        chunks.append(current)
    return chunks


def read_text_folder(
    path: str | Path, *, source: str | None = None, max_chars: int = 2000
) -> list[dict]:
    """Read every ``*.txt`` file of a folder, split at paragraphs into documents.

    ``source`` defaults to the folder's name, so a folder of one author's books becomes
    one source.
    """
    path = Path(path)
    _require(path, None)
    if not path.is_dir():
        raise InputError(f"Text source {path} is not a folder: pass a folder of *.txt files.")
    label = source or path.name
    docs = []
    for file in sorted(path.glob("*.txt")):
        text = _clean(file.read_text(encoding="utf-8", errors="replace"))
        for k, chunk in enumerate(_pack_paragraphs(text, max_chars)):
            docs.append(_doc(f"{label}/{file.stem}/{k:04d}", chunk, label))
    return docs
