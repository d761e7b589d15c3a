"""`import trainlint` (and `trainlint.integrations`) import no training engine."""

from __future__ import annotations

import subprocess
import sys

ENGINES = ("lightning", "pytorch_lightning", "transformers", "accelerate", "tensorboard")


def test_engines_are_imported_lazily():
    code = ("import sys, trainlint, trainlint.integrations, trainlint.sinks, "
            "trainlint.distributed; "
            f"print([m for m in {ENGINES!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
