"""build_model() ends the process (a script's guard against a missing GPU, say)."""

import sys

from _helpers import small_batch


def build_model():
    sys.exit(3)


def get_batch():
    return small_batch()
