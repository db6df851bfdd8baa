"""The launcher's bad states give clear errors, and `down` leaves nothing behind."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from kubeml._proc import pid_alive
from kubeml.testing.cluster import (
    AssetsMissing,
    Cluster,
    ClusterAlreadyRunning,
    NodeGroup,
    PortInUse,
    find_assets,
)
from kubeml.testing.cluster.fixtures import wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.environ.get("KUBEML_TEST_CLUSTER") == "existing",
                       reason="exercises the local launcher itself"),
]

ONE_NODE = (NodeGroup("cpu", "m5.large", count=1, cpu="2", memory="8Gi"),)


def _listening_ports() -> set[int]:
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _ports_of(cluster: Cluster) -> set[int]:
    state = cluster._read_state()
    assert state is not None
    urls = [state["server"], *state["health"].values()]
    return {urlsplit(u).port for u in urls}


def test_missing_assets_error_says_how_to_build_them(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(tmp_path))

    with pytest.raises(AssetsMissing, match="make cluster-assets") as excinfo:
        find_assets(build=True)

    assert "kube-apiserver" in str(excinfo.value)


def test_port_in_use_is_reported_before_anything_starts(tmp_path):
    find_assets()  # the error under test must not be an AssetsMissing
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cluster = Cluster("port-test", state_dir=tmp_path / "state", apiserver_port=port)

        with pytest.raises(PortInUse, match=f"port {port}"):
            cluster.up()

    assert not (tmp_path / "state" / "state.json").exists()


@pytest.mark.slow
def test_crashed_cluster_is_cleaned_up_and_down_leaves_no_process_or_port(tmp_path):
    state_dir = tmp_path / "state"
    first = Cluster("lifecycle", state_dir=state_dir, node_groups=ONE_NODE).up()
    try:
        assert first.status().healthy
        with pytest.raises(ClusterAlreadyRunning, match="kubeml cluster down --name lifecycle"):
            Cluster("lifecycle", state_dir=state_dir).up()

        # A crash: every component dies without cleanup, state.json stays behind.
        for component in first.status().components:
            os.kill(component.pid, signal.SIGKILL)
        wait_until(lambda: not any(pid_alive(c.pid) for c in first.status().components),
                   timeout_s=10, what="the killed components to exit")

        second = Cluster("lifecycle", state_dir=state_dir, node_groups=ONE_NODE).up()
        status = second.status()
        assert status.healthy
        pids, ports = [c.pid for c in status.components], _ports_of(second)

        second.down()

        assert not [pid for pid in pids if pid_alive(pid)]
        assert not ports & _listening_ports()
        assert not state_dir.exists()
    finally:
        first.down()
