"""Shared text plumbing of the prepare stage: raw documents, decoding, chunking, HTML to text.

Every source (default packages, local files, Hugging Face datasets) yields
:class:`RawDoc` records; :func:`chunk` then cuts long texts into documents at line
boundaries. Problems that skip input (a binary file, a jsonl line without its text
field) go through :class:`Issues`, which warns and keeps a record for the manifest.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any, NamedTuple, Optional


class PrepareError(ValueError):
    """Input the prepare stage cannot use: names what, where, and how to fix it."""


class DataWarning(UserWarning):
    """Input that was skipped; the message names the file or domain and the reason."""


def file_safe(label: str) -> str:
    """``label`` as letters, digits, ``_ . -`` (each other run becomes ``_``, ends trimmed); empty if none is left."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label.strip()).strip("._-")


class RawDoc(NamedTuple):
    """One text of a source, before chunking. ``key`` is unique within its domain; ``labels`` holds the
    values of the source's label fields (``prepare.<source>.label_fields``), carried to each document."""

    domain: str
    key: str
    text: str
    labels: Optional[dict[str, str]] = None


@dataclass
class Issues:
    """Collects skipped input: each one is warned about and listed in the manifest."""

    skipped: list[dict[str, str]] = field(default_factory=list)
    max_per_file: int = 5
    _per_file: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, *, file: Optional[str] = None, domain: Optional[str] = None) -> None:
        where = {"file": file} if file is not None else {"domain": str(domain)}
        self.skipped.append({**where, "reason": reason})
        key = file.rsplit(":", 1)[0] if file and ":" in file else (file or "")
        n = self._per_file[key] = self._per_file.get(key, 0) + 1
        if file is not None and n > self.max_per_file:
            if n == self.max_per_file + 1:
                warnings.warn_explicit(f"{key}: more skipped lines; further warnings for this file are only "
                                       f"in the manifest's 'skipped' list", DataWarning, "prepare", 0)
            return
        label = f"file {file}" if file is not None else f"domain {domain!r}"
        # warn_explicit: no source line of this module in the message, and every skip is shown
        warnings.warn_explicit(f"skipped {label}: {reason}", DataWarning, "prepare", 0)


def decode(data: bytes, name: str, issues: Issues) -> Optional[str]:
    """UTF-8 text of ``data``, or None (with a warning naming ``name``) if binary or not UTF-8."""
    if b"\x00" in data[:8192] or b"\x00" in data[-8192:]:
        issues.skip("binary file (contains NUL bytes)", file=name)
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        issues.skip(f"not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                    f"convert it with e.g. `iconv -f latin1 -t utf-8`", file=name)
        return None
    return normalise(text)


def normalise(text: str) -> str:
    """Unix line ends, no byte-order mark, no NULs, no lone surrogates (so it encodes as UTF-8)."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from a JSON "\\ud800" escape
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def chunk(text: str, size: int) -> list[str]:
    """Cut ``text`` into pieces of about ``size`` characters at line boundaries.

    A line longer than ``size`` is cut inside the line; a short tail (under a
    tenth of ``size``) is appended to the piece before it. Whitespace-only pieces
    are dropped.
    """
    pieces: list[str] = []
    buf: list[str] = []
    n = 0
    for line in text.splitlines(keepends=True):
        while len(line) > size:  # over-long line (minified data, one-paragraph files)
            if buf:
                pieces.append("".join(buf))
                buf, n = [], 0
            pieces.append(line[:size])
            line = line[size:]
        buf.append(line)
        n += len(line)
        if n >= size:
            pieces.append("".join(buf))
            buf, n = [], 0
    if buf:
        tail = "".join(buf)
        if pieces and len(tail) < size // 10:
            pieces[-1] += tail
        else:
            pieces.append(tail)
    return [p for p in pieces if p.strip()]


def dotted_get(record: Any, path: str) -> Any:
    """``record["a"]["b"]`` for ``path="a.b"``; a key that is itself dotted is tried first."""
    if isinstance(record, dict) and path in record:
        return record[path]
    node = record
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


_LINE = {"br", "li", "tr", "dt", "dd", "title", "hr", "div", "td", "th"}  # end a line
_PARA = {"p", "pre", "table", "ul", "ol", "dl", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article",
         "blockquote"}  # end a paragraph (blank line after)
_SKIP = {"script", "style", "head", "noscript"}


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip_depth = 0
        self.pre_depth = 0

    def _break(self, n: int) -> None:
        """Make the text so far end in at least ``n`` newlines (none at the very start)."""
        tail = "".join(self.out[-3:])
        have = len(tail) - len(tail.rstrip("\n"))
        if self.out and have < n:
            self.out.append("\n" * (n - have))

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in _SKIP:
            self.skip_depth += 1
        if tag == "pre":
            self.pre_depth += 1
        if tag in _LINE or tag in _PARA:
            self._break(2 if tag in _PARA else 1)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP and self.skip_depth:
            self.skip_depth -= 1
        if tag == "pre" and self.pre_depth:
            self.pre_depth -= 1
        if tag in _LINE or tag in _PARA:
            self._break(2 if tag in _PARA else 1)

    def handle_data(self, data: str) -> None:
        if self.skip_depth:
            return
        if not self.pre_depth:
            data = re.sub(r"[ \t\r\n]+", " ", data)
            if not self.out or self.out[-1].endswith("\n"):
                data = data.lstrip(" ")
        if data:
            self.out.append(data)


def html_to_text(markup: str) -> str:
    """Readable text of an HTML page (stdlib ``html.parser``): blocks become lines, scripts vanish."""
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    text = "".join(parser.out)
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n") + "\n"
