"""Shared fixtures of the pretraining tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (``pytestmark = usefixtures("one_thread")``):
    the tiny models gain nothing from a second thread, and lose a lot when the CPU is
    shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
