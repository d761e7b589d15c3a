"""Suppression: ``# trainlint: ignore[...]`` comments and ``per-module-ignores`` globs.

A finding is suppressed when the source line that built its module carries
``# trainlint: ignore`` (every rule) or ``# trainlint: ignore[TL401, dead-relu]`` (those rules),
or when its module name matches a glob of ``[tool.trainlint.per-module-ignores]`` listing its
code. Suppressed findings are kept on the report (``Report.suppressed``), never dropped.
"""

from __future__ import annotations

import fnmatch
import io
import os
import re
import tokenize
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

from .engine import Finding, resolve_codes
from .errors import ConfigError
from .report import relative_path

IGNORE_COMMENT = re.compile(r"^#.*?\btrainlint:\s*ignore\b(.*)$", re.IGNORECASE)
ALL = "*"
MALFORMED = object()


@dataclass
class Suppressed:
    """A finding that was not reported as active, and why."""

    finding: Finding
    kind: str  # "inline" (a source comment) or "config" (per-module-ignores)
    reason: str


def resolve_ignores(table: Mapping[str, Iterable[str]]) -> dict[str, frozenset]:
    """Validate ``per-module-ignores`` (glob -> codes/names/prefixes) into glob -> codes."""
    return {pattern: frozenset(resolve_codes(list(codes))) for pattern, codes in table.items()}


# The first word after ``ignore`` and any punctuation: a code list written the wrong way
# names a rule there (``ignore: TL102``, ``ignore(dead-relu)``).
_FIRST_WORD = re.compile(r"^[\s:(={;.,\-]*([A-Za-z][\w-]*)")


def _code_list(rest: str) -> object:
    """What follows ``trainlint: ignore`` in a comment: the text of its code list (``[...]``,
    a space before it allowed), None for a bare ignore (nothing, or a reason: ``ignore (kept
    on purpose)``), or MALFORMED where a rule is named outside brackets (``ignore: TL102``,
    ``ignore(TL102)``) or the bracket is not closed, which suppresses nothing: a typo must not
    switch every rule off."""
    stripped = rest.lstrip()
    if stripped.startswith("["):
        end = stripped.find("]")
        return stripped[1:end] if end > 0 else MALFORMED
    word = _FIRST_WORD.match(rest)
    if word is None:
        return None
    try:
        resolve_codes([word.group(1)])
    except ConfigError:
        return MALFORMED if re.fullmatch(r"TL\d*", word.group(1), re.IGNORECASE) else None
    return MALFORMED


def _codes_in(spec: Optional[str], where: str, notes: list) -> frozenset:
    """Codes named in the brackets of an ignore comment; ``None`` (no brackets) means all."""
    if spec is None:
        return frozenset([ALL])
    codes: set = set()
    for token in spec.split(","):
        token = token.strip()
        if not token:
            continue
        try:
            codes |= resolve_codes([token])
        except ConfigError:
            notes.append(f"{where}: unknown rule {token!r} in a '# trainlint: ignore' comment")
    return frozenset(codes)


def comments_by_line(source: str) -> dict[int, str]:
    """The comment of each line of a Python source (a marker inside a string is no comment);
    for text that does not tokenize, everything from a line's first ``#``."""
    try:
        return {tok.start[0]: tok.string
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    except (tokenize.TokenError, SyntaxError):
        return {i: line[line.index("#"):]
                for i, line in enumerate(source.splitlines(), 1) if "#" in line}


# The comments of the source files read so far, by path: ``((mtime_ns, size), comments)``,
# tokenized again when the file changes (a Monitor with ``fail_on`` builds a report at every
# observed step; tokenizing a model's file each time cost ~20 ms on a ResNet-50 layout).
_FILE_COMMENTS: dict[str, tuple] = {}
_MAX_FILES = 64


def file_comments(path: str) -> dict[int, str]:
    """:func:`comments_by_line` of the file at ``path`` ({} when it cannot be read), read
    again only when its modification time or size changed."""
    try:
        stat = os.stat(path)
    except OSError:
        return {}
    version = (stat.st_mtime_ns, stat.st_size)
    cached = _FILE_COMMENTS.get(path)
    if cached is not None and cached[0] == version:
        return cached[1]
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            comments = comments_by_line(handle.read())
    except OSError:
        return {}
    if path not in _FILE_COMMENTS and len(_FILE_COMMENTS) >= _MAX_FILES:
        _FILE_COMMENTS.pop(next(iter(_FILE_COMMENTS)))
    _FILE_COMMENTS[path] = (version, comments)
    return comments


class _Comments:
    """Ignore comments of source lines, each line's parsed once (each file's read once:
    :func:`file_comments`)."""

    def __init__(self, notes: list) -> None:
        self.notes = notes
        self.parsed: dict[tuple, frozenset] = {}

    def codes_at(self, path: str, line: int) -> frozenset:
        key = (path, line)
        if key not in self.parsed:
            match = IGNORE_COMMENT.search(file_comments(path).get(line, ""))
            where = f"{relative_path(path)}:{line}"
            spec = _code_list(match.group(1)) if match else None
            if match is None:
                self.parsed[key] = frozenset()
            elif spec is MALFORMED:
                self.notes.append(f"{where}: malformed '# trainlint: ignore' comment "
                                  f"({match.group(0)!r}) suppresses nothing; write "
                                  "'# trainlint: ignore[TL101, TL102]' or a bare "
                                  "'# trainlint: ignore'")
                self.parsed[key] = frozenset()
            else:
                self.parsed[key] = _codes_in(spec, where, self.notes)
        return self.parsed[key]


def apply_suppressions(findings: Iterable[Finding],
                       per_module_ignores: Optional[Mapping[str, Iterable[str]]] = None,
                       ) -> tuple[list[Finding], list[Suppressed], list[str]]:
    """Split ``findings`` into (kept, suppressed, notes about malformed comments)."""
    notes: list[str] = []
    ignores = resolve_ignores(per_module_ignores or {})
    comments = _Comments(notes)
    kept: list[Finding] = []
    suppressed: list[Suppressed] = []
    for f in findings:
        why = _inline(f, comments) or _configured(f, ignores)
        if why is None:
            kept.append(f)
        else:
            suppressed.append(Suppressed(f, *why))
    return kept, suppressed, notes


def _inline(f: Finding, comments: _Comments) -> Optional[tuple[str, str]]:
    if f.location is None:
        return None
    codes = comments.codes_at(f.location.path, f.location.line)
    if ALL in codes or f.code in codes:
        where = f"{relative_path(f.location.path)}:{f.location.line}"
        return "inline", f"'# trainlint: ignore' comment at {where}"
    return None


def _configured(f: Finding, ignores: Mapping[str, frozenset]) -> Optional[tuple[str, str]]:
    for pattern, codes in ignores.items():
        if f.code in codes and fnmatch.fnmatchcase(f.module, pattern):
            return "config", f"per-module-ignores {pattern!r}"
    return None
