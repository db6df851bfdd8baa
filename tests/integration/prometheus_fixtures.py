"""A real Prometheus server for tests: its own process, port, config and storage.

Import what a module uses (``from tests.integration.prometheus_fixtures import ...``) and
start it with :func:`running_prometheus` once the targets it should scrape are up. The
binary comes from ``hack/prometheus/install.sh`` (``make prometheus-assets``); the
distribution's service, if any, is never used.

Targets are static, labelled as the Prometheus Operator labels a target found through a
ServiceMonitor (``job`` = the Service, ``namespace``, ``service``, ``pod``,
``container``, ``endpoint``), so PromQL written for the cluster runs unchanged.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from kubeml._proc import free_port

#: Seconds between scrapes and rule evaluations. Short, so a test waits seconds for its
#: traffic to show up; the rollout analysis copes with it through its minimum window.
SCRAPE_INTERVAL_S = 1.0
#: Start-up budget: TSDB creation and the web UI take ~1 s; CI machines are loaded.
READY_TIMEOUT_S = 60.0
#: Scrape job, named as the Prometheus Operator names the job of a ServiceMonitor endpoint.
JOB_NAME = "serviceMonitor/kubeml-system/kubeml-model-servers/0"


@dataclass(frozen=True)
class ScrapeTarget:
    """One ``/metrics`` endpoint and the target labels a ServiceMonitor would give it."""

    address: str
    """``host:port`` of the model server."""
    namespace: str
    service: str
    """The predictor Service, e.g. ``digits-predictor`` (also the ``job`` label)."""
    pod: str
    container: str = "kserve-container"
    endpoint: str = "http1"
    """Name of the Service port scraped (the predictor's HTTP port)."""
    extra_labels: dict[str, str] = field(default_factory=dict)

    def labels(self) -> dict[str, str]:
        return {
            "job": self.service,
            "namespace": self.namespace,
            "service": self.service,
            "pod": self.pod,
            "container": self.container,
            "endpoint": self.endpoint,
            **self.extra_labels,
        }


@dataclass(frozen=True)
class PrometheusServer:
    """Handle on a running test Prometheus."""

    url: str
    scrape_interval_s: float
    targets: tuple[ScrapeTarget, ...]
    log_file: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        r = requests.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        r.raise_for_status()
        return r.json()["data"]["result"]

    def wait_scraped_after(self, t: float, *, timeout_s: float = 30.0) -> None:
        """Wait until every target has been scraped, successfully, after unix time ``t``.

        After this, counters seen by a query include everything the servers counted
        before ``t``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            # timestamp() of a plain selector is the sample's scrape time (of an
            # expression it would be the evaluation time), so up's value is read apart.
            up = {r["metric"]["instance"] for r in self.query("up") if r["value"][1] == "1"}
            fresh = {
                r["metric"]["instance"]
                for r in self.query("timestamp(up)")
                if float(r["value"][1]) > t and r["metric"]["instance"] in up
            }
            if fresh >= {target.address for target in self.targets}:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"targets not scraped since {t:.1f}: only {sorted(fresh)} of "
                    f"{sorted(target.address for target in self.targets)}; "
                    f"see {self.log_file} and {self.url}/targets"
                )
            time.sleep(self.scrape_interval_s / 4)


def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError(
            "prometheus is not on PATH; run `make prometheus-assets` "
            "(bash hack/prometheus/install.sh) first"
        )
    return binary


def _config(targets: tuple[ScrapeTarget, ...], scrape_interval_s: float) -> dict[str, Any]:
    interval = f"{int(scrape_interval_s * 1000)}ms"
    return {
        "global": {
            "scrape_interval": interval,
            "evaluation_interval": interval,
            # Must not exceed the interval (Prometheus refuses the config otherwise).
            "scrape_timeout": interval,
        },
        "scrape_configs": [
            {
                "job_name": JOB_NAME,
                "metrics_path": "/metrics",
                "static_configs": [
                    {"targets": [t.address], "labels": t.labels()} for t in targets
                ],
            }
        ],
    }


@contextlib.contextmanager
def running_prometheus(
    targets: list[ScrapeTarget] | tuple[ScrapeTarget, ...],
    work_dir: Path,
    *,
    scrape_interval_s: float = SCRAPE_INTERVAL_S,
) -> Iterator[PrometheusServer]:
    """Start Prometheus scraping ``targets``, wait on ``/-/ready``, stop it on exit.

    Config, TSDB and log live under ``work_dir``. Raises ``RuntimeError`` with the log
    tail when the process exits or is not ready in :data:`READY_TIMEOUT_S`.
    """
    targets = tuple(targets)
    if not targets:
        raise ValueError("running_prometheus needs at least one scrape target")
    work_dir.mkdir(parents=True, exist_ok=True)
    config = work_dir / "prometheus.yml"
    # JSON is YAML: no YAML writer needed for a generated config.
    config.write_text(json.dumps(_config(targets, scrape_interval_s), indent=2))
    port = free_port()
    log_file = work_dir / "prometheus.log"
    cmd = [
        prometheus_binary(),
        f"--config.file={config}",
        f"--storage.tsdb.path={work_dir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1h",
    ]
    with log_file.open("wb") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, close_fds=True
        )
    server = PrometheusServer(f"http://127.0.0.1:{port}", scrape_interval_s, targets, log_file)
    try:
        _wait_ready(proc, server)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _wait_ready(proc: subprocess.Popen[bytes], server: PrometheusServer) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        code = proc.poll()
        if code is not None:
            raise RuntimeError(
                f"prometheus exited with status {code} before it was ready:\n{_tail(server.log_file)}"
            )
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{server.url}/-/ready", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"prometheus not ready after {READY_TIMEOUT_S:.0f} s:\n{_tail(server.log_file)}"
            )
        time.sleep(0.2)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
