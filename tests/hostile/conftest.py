"""One whole stack for the hostile-input tests: they send bad input, they do not break the stack."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from faults.harness import fault_stack

from stepwise.stack import Stack


@pytest.fixture(scope="session")
def hostile_stack() -> Iterator[Stack]:
    with fault_stack() as stack:
        yield stack
