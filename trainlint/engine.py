"""The rule registry, selection, thresholds and running the rules over a trace."""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

from .errors import ConfigError
from .trace import Location, RunTrace

SEVERITIES = ("error", "warning", "info")
SEVERITY_RANK = {"error": 0, "warning": 1, "info": 2}


@dataclass
class Finding:
    """One thing wrong with the run, with the numbers and the fix."""

    code: str
    rule: str
    severity: str
    module: str
    message: str
    fix: str
    location: Optional[Location] = None
    evidence: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "code": self.code, "rule": self.rule, "severity": self.severity,
            "module": self.module, "message": self.message, "fix": self.fix,
            "location": ({"path": self.location.path, "line": self.location.line}
                         if self.location else None),
            "evidence": self.evidence,
        }


@dataclass
class Hit:
    """What a rule function yields: the engine adds code, name, severity and location."""

    module: str
    message: str
    fix: str
    evidence: dict = field(default_factory=dict)
    location: Optional[Location] = None
    severity: Optional[str] = None


class Skip(Exception):
    """Raised by a rule when the trace lacks what it needs; becomes a run note."""


@dataclass(frozen=True)
class Rule:
    code: str
    name: str
    severity: str
    func: Callable[..., Iterable[Hit]]
    defaults: Mapping[str, Any]
    doc: str
    concern: str

    @property
    def summary(self) -> str:
        """The docstring's first paragraph, on one line (the rule's name when undocumented)."""
        first = self.doc.strip().split("\n\n", 1)[0]
        return " ".join(first.split()) or self.name


class Thresholds:
    """Read-only attribute access to a rule's thresholds (defaults overridden by config)."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def as_dict(self) -> dict:
        return dict(self._values)


RULES: dict[str, Rule] = {}


def rule(code: str, name: str, severity: str, **defaults: Any) -> Callable:
    """Register a rule: ``@rule("TL101", "dead-relu", "warning", dead_fraction=0.25)``."""
    if severity not in SEVERITIES:
        raise ValueError(f"bad severity {severity!r}")

    def register(func: Callable[..., Iterable[Hit]]) -> Callable[..., Iterable[Hit]]:
        concern = func.__module__.rsplit(".", 1)[-1]
        RULES[code] = Rule(code=code, name=name, severity=severity, func=func,
                           defaults=MappingProxyType(dict(defaults)),
                           doc=inspect.cleandoc(func.__doc__ or ""), concern=concern)
        return func

    return register


def load_rules() -> dict[str, Rule]:
    """Import every module of the catalog (``trainlint.rules``) so its rules register."""
    from . import rules as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    return dict(sorted(RULES.items()))


def resolve_codes(names: Iterable[str]) -> set[str]:
    """Map codes, names or code prefixes ("TL1") to rule codes; unknown ones raise ConfigError."""
    rules = load_rules()
    by_name = {r.name: r.code for r in rules.values()}
    out: set[str] = set()
    for raw in names:
        token = raw.strip()
        if not token:
            continue
        upper = token.upper()
        if upper == "ALL":
            out |= set(rules)
        elif upper in rules:
            out.add(upper)
        elif token in by_name:
            out.add(by_name[token])
        elif upper.startswith("TL") and any(c.startswith(upper) for c in rules):
            out |= {c for c in rules if c.startswith(upper)}
        else:
            raise ConfigError(
                f"unknown rule {token!r}: use a code (TL101), a name (dead-relu) or a prefix "
                f"(TL1); `trainlint rules` lists them")
    return out


@dataclass
class Selection:
    """Which rules run and with which thresholds."""

    select: Optional[set] = None
    ignore: set = field(default_factory=set)
    thresholds: dict = field(default_factory=dict)
    # module-name glob -> codes whose findings on matching modules are suppressed
    per_module_ignores: dict = field(default_factory=dict)

    def active(self) -> list[Rule]:
        rules = load_rules()
        chosen = self.select if self.select is not None else set(rules)
        return [rules[c] for c in sorted(chosen - self.ignore)]

    def thresholds_for(self, r: Rule) -> Thresholds:
        values = dict(r.defaults)
        values.update(self.thresholds.get(r.code, {}))
        return Thresholds(values)


def set_thresholds(selection: Selection, overrides: Mapping[str, Mapping[str, Any]]) -> None:
    """Validate and store per-rule threshold overrides keyed by code or name."""
    rules = load_rules()
    for key, values in overrides.items():
        codes = resolve_codes([key])
        if len(codes) != 1 or not isinstance(values, Mapping):
            raise ConfigError(f"thresholds for {key!r} must be a table under one rule")
        code = codes.pop()
        for name, value in values.items():
            default = rules[code].defaults.get(name)
            if name not in rules[code].defaults:
                known = ", ".join(rules[code].defaults) or "none"
                raise ConfigError(f"{code} has no threshold {name!r} (known: {known})")
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"{code}.{name} must be a number, got {value!r}")
                if math.isnan(value) or (default >= 0) != (value >= 0):
                    raise ConfigError(f"{code}.{name} must be a number of the default's sign "
                                      f"({default!r}), got {value!r}")
            selection.thresholds.setdefault(code, {})[name] = value


def run_rules(trace: RunTrace, selection: Selection) -> tuple[list[Finding], list[str]]:
    """Apply every active rule; return findings (most severe first) and skip notes."""
    findings: list[Finding] = []
    notes: list[str] = []
    for r in selection.active():
        try:
            hits = list(r.func(trace, selection.thresholds_for(r)))
        except Skip as why:
            notes.append(skip_note(r, str(why)))
            continue
        findings.extend(_finding(r, hit, trace) for hit in hits)
    return sort_findings(findings, module_order(trace)), notes


def skip_note(r: Rule, why: str) -> str:
    """The run note of a rule that could not run (``why`` empty: the note's prefix)."""
    return f"{r.code} {r.name} not checked: {why}"


def module_order(trace: RunTrace) -> dict[str, int]:
    """Each module's position: first forward execution, then declaration order."""
    order: dict[str, int] = {}
    for lt in trace.ordered_layers():
        order.setdefault(lt.module, len(order))
    for name in trace.modules:
        order.setdefault(name, len(order))
    return order


def sort_findings(findings: Iterable[Finding],
                  order: Optional[Mapping[str, int]] = None) -> list[Finding]:
    """Most severe first; then by code, then by the module's position in the model."""
    order = order or {}
    return sorted(findings, key=lambda f: (SEVERITY_RANK[f.severity], f.code,
                                           order.get(f.module, len(order)), f.module))


def _finding(r: Rule, hit: Hit, trace: RunTrace) -> Finding:
    location = hit.location
    if location is None:
        facts = trace.modules.get(hit.module)
        location = facts.location if facts is not None else None
    return Finding(code=r.code, rule=r.name, severity=hit.severity or r.severity,
                   module=hit.module, message=hit.message, fix=hit.fix, location=location,
                   evidence=hit.evidence)


def iter_rules() -> Iterator[Rule]:
    yield from load_rules().values()
