"""Fuzzing settings: the number of examples per reader comes from ``FUZZ_EXAMPLES``.

The normal suite runs a few hundred per reader (seconds); the long run is
``FUZZ_EXAMPLES=10000 python -m pytest -p no:randomly tests/fuzz``.
"""

from __future__ import annotations

import multiprocessing
import os

import pytest
from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
TIMEOUT_S = float(os.environ.get("FUZZ_TIMEOUT_S", "30"))

settings.register_profile(
    "fuzz",
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    database=None,
    # The suite's short run draws the same inputs every time (a CI result is reproducible);
    # a long run (FUZZ_EXAMPLES set) explores new ones.
    derandomize="FUZZ_EXAMPLES" not in os.environ,
)


class Worker:
    """One spawned process (a clean interpreter: no inherited JAX threads) running the readers,
    restarted when a call hangs or kills it."""

    def __init__(self) -> None:
        self._start()
        self.calls = 0

    def _start(self) -> None:
        from . import _worker

        self.pool = multiprocessing.get_context("spawn").Pool(1, initializer=_worker.init)

    def run(self, reader: str, files: dict[str, bytes], target: str) -> tuple[str, str, int] | None:
        """``(outcome, message, peak)``, or None when the reader hung or crashed the worker."""
        from . import _worker

        self.calls += 1
        pending = self.pool.apply_async(_worker.run, (reader, files, target))
        try:
            return pending.get(timeout=TIMEOUT_S)
        except multiprocessing.TimeoutError:
            self.pool.terminate()
            self._start()
            return None

    def close(self) -> None:
        self.pool.terminate()


@pytest.fixture(scope="session")
def worker():
    worker = Worker()
    yield worker
    worker.close()
