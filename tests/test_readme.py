"""README.md stays true: its rule table is the registry, its commands are the Makefile's."""

from __future__ import annotations

import re

from trainlint.engine import iter_rules

from .conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_rule_table_lists_every_rule_with_name_and_severity() -> None:
    rows = {m.group(1): (m.group(2), m.group(3))
            for m in re.finditer(r"^\| (TL\d{3}) \| ([a-z0-9-]+) \| (\w+) \|", README, re.M)}
    assert rows == {r.code: (r.name, r.severity) for r in iter_rules()}


def test_opening_commands_are_make_targets_and_ci_runs_the_test_one() -> None:
    opening = README.split("```", 2)[1]
    commands = re.findall(r"^(make \w+)", opening, re.M)
    assert commands[:2] == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for command in commands:
        assert re.search(rf"^{command.split()[1]}:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_the_example_output_is_what_the_demo_prints() -> None:
    """The README shows `trainlint check fixtures/dead_relu.py` "from a real run": it had
    drifted (the wording of the step count, a weight's std, the fix's first words)."""
    from .conftest import run_cli

    text = README
    command = "$ trainlint check fixtures/dead_relu.py\n"
    start = text.index(command) + len(command)
    shown = text[start:text.index("```", start)]
    run = run_cli(["check", "fixtures/dead_relu.py"])
    assert run.exit_code == 1
    assert run.stdout == shown
