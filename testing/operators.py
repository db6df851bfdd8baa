"""Test harness: run the Tenant operator in-process, in a thread, against any cluster.

    with running_operator(OperatorConfig(resync_s=2), api_client) as operator:
        ...                      # create Tenants, wait for Ready
        operator.api.counts()    # API requests the operator made so far

The operator runs its own asyncio loop in a daemon thread, exactly as in the container (same
registry, handlers and settings); leaving the block stops it and waits for the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from kubeml.operators._desired import OperatorConfig
from kubeml.operators.tenant import TenantOperator

__all__ = ["running_operator"]

# Seconds to wait for kopf to list the Tenants and start its watch; a cold start on a
# loaded 2-core machine takes 1-3 s.
_READY_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 30.0


@contextlib.contextmanager
def running_operator(config: OperatorConfig, api_client: Any, **kwargs: Any) -> Iterator[TenantOperator]:
    """Start a :class:`TenantOperator` in a thread; stop it when the block ends."""
    operator = TenantOperator(config, api_client, **kwargs)
    stop = threading.Event()
    ready = threading.Event()
    failure: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(operator.run(stop_flag=stop, ready_flag=ready))
        except BaseException as exc:  # reported to the caller below
            failure.append(exc)
            ready.set()

    thread = threading.Thread(target=target, name="tenant-operator", daemon=True)
    thread.start()
    if not ready.wait(_READY_TIMEOUT_S) or failure:
        stop.set()
        thread.join(_STOP_TIMEOUT_S)
        raise RuntimeError(f"the operator did not start: {failure[0] if failure else 'timed out'}")
    try:
        yield operator
    finally:
        stop.set()
        thread.join(_STOP_TIMEOUT_S)
    if failure:
        raise RuntimeError(f"the operator crashed: {failure[0]!r}") from failure[0]
