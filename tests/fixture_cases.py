"""What each bundled fixture must produce through ``trainlint check``.

Every fixture's docstring says what it is: ``Fault (TL101, ...): ...`` (those codes must fire)
or ``Healthy ...`` (no warning and no error from any rule). A fault for a Monitor run
(``Fault (TL603, Monitor)``, or a docstring that speaks of "a Monitor run") is checked by its
own tests; through ``trainlint check`` it must only run and report cleanly. ``REFINED`` adds,
for some fixtures, the modules each code must name (None: any module).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TANH_MLP_ACTIVATIONS = frozenset(str(i) for i in range(1, 20, 2))


@dataclass(frozen=True)
class FixtureCase:
    name: str
    expect: dict = field(default_factory=dict)
    twin_of: Optional[str] = None
    monitor: bool = False

    @property
    def healthy(self) -> bool:
        return not self.expect


REFINED = {case.name: case for case in [
    FixtureCase("dead_relu", {"TL101": {"3"}}),
    FixtureCase("healthy_relu", twin_of="dead_relu"),
    FixtureCase("functional_dead_relu", {"TL101": {"blocks.1"}}),
    FixtureCase("functional_relu", twin_of="functional_dead_relu"),
    FixtureCase("squeeze_excitation_dead", {"TL101": {"1.3.act"}}),
    FixtureCase("squeeze_excitation_ok", twin_of="squeeze_excitation_dead"),
    FixtureCase("init_tanh_large", {"TL102": TANH_MLP_ACTIVATIONS}),
    FixtureCase("init_tanh_small", {"TL103": None}),
    FixtureCase("init_tanh_xavier", twin_of="init_tanh_large"),
    FixtureCase("functional_tanh_saturated", {"TL102": {"hidden"}}),
    FixtureCase("functional_tanh", twin_of="functional_tanh_saturated"),
    FixtureCase("exploding_relu", {"TL104": None}),
    FixtureCase("init_relu_kaiming", twin_of="exploding_relu"),
    FixtureCase("batchnorm_small_batch", {"TL401": {"1", "4"}}),
    FixtureCase("batchnorm_large_batch", twin_of="batchnorm_small_batch"),
    FixtureCase("batchnorm_single_value", {"TL404": {"1"}}),
    FixtureCase("batchnorm_features", twin_of="batchnorm_single_value"),
    # act1's finding is suppressed by an inline comment.
    FixtureCase("report_suppressed", {"TL101": {"act2"}}),
]}

FAULT = re.compile(r"^Fault \(([^)]*)\)")


def from_docstring(path: Path) -> Optional[FixtureCase]:
    """The case a fixture's docstring declares, or None when it declares none."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    fault = FAULT.match(doc)
    if fault:
        codes = re.findall(r"TL\d{3}", fault.group(1))
        monitor = "Monitor" in fault.group(1) or "Monitor run" in doc
        return FixtureCase(path.stem, {c: None for c in codes}, monitor=monitor) if codes else None
    if doc.startswith("Healthy"):
        return FixtureCase(path.stem)
    return None


def fixture_names() -> list[str]:
    return sorted(p.stem for p in FIXTURES.glob("*.py") if not p.name.startswith("_"))


def case_for(name: str) -> Optional[FixtureCase]:
    return REFINED.get(name) or from_docstring(FIXTURES / f"{name}.py")
