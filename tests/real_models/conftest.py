"""Settings for the real-architecture suite."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run these small models on one intra-op thread: with many tiny ops (the probe's
    statistics) a second thread mostly adds synchronization, and on a busy machine its
    spin-waits make steps tens of times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
