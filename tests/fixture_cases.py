"""What each bundled fixture must produce through ``trainlint check``.

``expect`` maps a rule code to the modules it must name (None: any module, at least one
finding). A healthy twin expects nothing: no warning and no error from any rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

TANH_MLP_ACTIVATIONS = frozenset(str(i) for i in range(1, 20, 2))


@dataclass(frozen=True)
class FixtureCase:
    name: str
    expect: dict = field(default_factory=dict)
    twin_of: Optional[str] = None

    @property
    def healthy(self) -> bool:
        return not self.expect

    @property
    def exit_code(self) -> int:
        return 0 if self.healthy else 1


CASES = [
    FixtureCase("dead_relu", {"TL101": {"3"}}),
    FixtureCase("healthy_relu", twin_of="dead_relu"),
    FixtureCase("functional_dead_relu", {"TL101": {"blocks.1"}}),
    FixtureCase("functional_relu", twin_of="functional_dead_relu"),
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
]

BY_NAME = {case.name: case for case in CASES}
