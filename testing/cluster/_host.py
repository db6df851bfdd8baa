"""What a real node changes on the host, recorded before it starts and undone when it stops.

A kubelet, containerd, the CNI bridge plugin and the NetworkPolicy enforcer touch
machine-wide state that no state directory can hold: kernel tunables, iptables chains,
nftables tables, a bridge interface, network namespaces, cgroups, mounts, and a few paths
fixed in their code. :class:`HostSnapshot`
records all of it before the node starts (in the cluster's ``state.json``), and
:func:`restore_host` puts the machine back from that record, also after a crash, so
``kubeml cluster down`` leaves the host as it found it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "FIXED_PATHS",
    "create_cgroup_root",
    "TUNABLES",
    "HostSnapshot",
    "cgroup_mounts",
    "iptables_chains",
    "mounts_under",
    "nft_tables",
    "restore_host",
]

log = logging.getLogger("kubeml.testing.cluster")

#: Kernel tunables the kubelet sets at start (``protectKernelDefaults: false``), the bridge
#: plugin turns on (``ip_forward``), the node turns on for the NetworkPolicy enforcer
#: (``bridge-nf-call-iptables``) and kube-proxy may set; each is put back to its recorded
#: value.
TUNABLES = (
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward",
    # kube-proxy's, should a configuration ever let it touch them.
    "net.ipv4.conf.all.route_localnet",
    "net.bridge.bridge-nf-call-iptables",
    "net.netfilter.nf_conntrack_max",
)

#: Paths the kubelet, containerd and the CNI plugins use whatever they are configured with.
#: Those that did not exist before the node started are removed when it stops.
FIXED_PATHS = (
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
    "/opt/containerd",
    "/var/lib/cni",
    "/run/containerd",
    "/run/netns",
    "/var/run/netns",
    "/etc/cni",
    "/opt/cni",
    "/run/nri",
)

_MNT_DETACH = 2


@dataclass
class HostSnapshot:
    """The host state a real node may change, as found before it started."""

    tunables: dict[str, str] = field(default_factory=dict)
    absent_paths: list[str] = field(default_factory=list)
    """Of :data:`FIXED_PATHS`, those that did not exist."""
    netns: list[str] = field(default_factory=list)
    """Network namespaces in ``/run/netns`` before the start."""
    chains: dict[str, list[str]] = field(default_factory=dict)
    """iptables chains per table before the start."""
    links: list[str] = field(default_factory=list)
    """Network interfaces before the start."""
    nft_tables: list[str] = field(default_factory=list)
    """nftables tables (``"<family> <name>"``) before the start."""

    @classmethod
    def take(cls) -> HostSnapshot:
        return cls(
            tunables={name: value for name in TUNABLES if (value := read_tunable(name)) is not None},
            absent_paths=[p for p in FIXED_PATHS if not os.path.lexists(p)],
            netns=sorted(_netns_names()),
            chains=iptables_chains(),
            links=sorted(network_links()),
            nft_tables=nft_tables(),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HostSnapshot:
        return cls(**{k: data.get(k, v) for k, v in asdict(cls()).items()})


def read_tunable(name: str) -> str | None:
    try:
        return Path("/proc/sys", *name.split(".")).read_text().strip()
    except OSError:
        return None


def write_tunable(name: str, value: str) -> None:
    try:
        Path("/proc/sys", *name.split(".")).write_text(value)
    except OSError as exc:
        log.warning("could not restore %s=%s: %s", name, value, exc)


def _netns_names() -> set[str]:
    names: set[str] = set()
    for directory in ("/run/netns", "/var/run/netns"):
        with contextlib.suppress(OSError):
            names |= set(os.listdir(directory))
    return names


def network_links() -> set[str]:
    try:
        return set(os.listdir("/sys/class/net"))
    except OSError:
        return set()


def iptables_chains() -> dict[str, list[str]]:
    """``{table: [chain, ...]}`` from ``iptables-save``; empty when iptables is missing."""
    try:
        out = subprocess.run(["iptables-save"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    chains: dict[str, list[str]] = {}
    table = ""
    for line in out.splitlines():
        if line.startswith("*"):
            table = line[1:]
            chains[table] = []
        elif line.startswith(":") and table:
            chains[table].append(line[1:].split()[0])
    return chains


def nft_tables() -> list[str]:
    """Every nftables table as ``"<family> <name>"``, sorted; empty when nft is missing.

    The iptables-nft tables (``ip filter``, ``ip nat``...) are listed too.
    """
    try:
        out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=30,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted(line.split(None, 1)[1].strip() for line in out.splitlines() if line.startswith("table "))


def delete_nft_table(table: str) -> None:
    """Delete nftables table ``"<family> <name>"`` (rules, sets, chains with it), if it exists."""
    if table not in nft_tables():
        return
    family, name = table.split()
    try:
        result = subprocess.run(["nft", "delete", "table", family, name], capture_output=True, text=True,
                                timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not delete nftables table %s: %s", table, exc)
        return
    if result.returncode != 0:
        log.warning("could not delete nftables table %s: %s", table, result.stderr.strip())


def mounts_under(root: str | Path) -> list[str]:
    """Mount points at or below ``root``, deepest first (the order to unmount them)."""
    prefix = str(root).rstrip("/")
    points: list[str] = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as handle:
        for line in handle:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return sorted(set(points), key=lambda p: (p.count("/"), p), reverse=True)


def cgroup_mounts() -> list[Path]:
    """Mount points of every cgroup hierarchy (v1 controllers and the unified one)."""
    points: list[Path] = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            separator = fields.index("-")
            if fields[separator + 1] in ("cgroup", "cgroup2"):
                points.append(Path(fields[4]))
    return points


def unmount(point: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(point.encode(), _MNT_DETACH) != 0:
        errno = ctypes.get_errno()
        if errno not in (22, 2):  # EINVAL: not a mount point (any more); ENOENT: gone
            log.warning("could not unmount %s: %s", point, os.strerror(errno))


def create_cgroup_root(name: str) -> None:
    """Create cgroup ``/<name>`` in every hierarchy (the kubelet's ``cgroupRoot``).

    A new v1 cpuset cgroup has no CPUs or memory nodes and takes no processes until it is
    given its parent's.
    """
    for mount in cgroup_mounts():
        root = mount / name
        root.mkdir(exist_ok=True)
        for knob in ("cpuset.cpus", "cpuset.mems"):
            parent, own = mount / knob, root / knob
            if parent.exists() and own.exists() and not own.read_text().strip():
                own.write_text(parent.read_text().strip())


def kill_cgroup_tree(name: str) -> int:
    """SIGKILL every process in cgroup ``/<name>`` and below, in every hierarchy."""
    killed = 0
    for mount in cgroup_mounts():
        root = mount / name
        if not root.is_dir():
            continue
        for procs in root.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                for pid in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(int(pid), signal.SIGKILL)
                        killed += 1
    return killed


def remove_cgroup_tree(name: str, timeout_s: float = 10.0) -> list[str]:
    """rmdir cgroup ``/<name>`` bottom-up in every hierarchy; returns what could not go."""
    deadline = time.monotonic() + timeout_s
    left: list[str] = []
    for mount in cgroup_mounts():
        root = mount / name
        if not root.is_dir():
            continue
        dirs = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for directory in [*dirs, root]:
            while True:
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    # EBUSY while the killed processes are still exiting.
                    if time.monotonic() > deadline:
                        left.append(str(directory))
                        break
                    time.sleep(0.05)
    return left


def processes_matching(pattern: re.Pattern[str]) -> list[int]:
    """Pids whose NUL-joined command line matches ``pattern``."""
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if pattern.search(cmdline):
            pids.append(int(entry))
    return pids


def _iptables(*args: str) -> bool:
    try:
        return subprocess.run(["iptables", "-w", "5", *args], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def remove_chain(table: str, chain: str) -> None:
    """Delete every rule jumping to ``chain`` in ``table``, then flush and delete it."""
    try:
        rules = subprocess.run(["iptables-save", "-t", table], capture_output=True, text=True,
                               timeout=30).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return
    for rule in rules:
        if rule.startswith("-A ") and re.search(rf"(-j|-g) {re.escape(chain)}(\s|$)", rule):
            # shlex: kube-proxy's rules carry quoted comments ("kubernetes service portals").
            _iptables("-t", table, "-D", *shlex.split(rule[3:]))
    _iptables("-t", table, "-F", chain)
    _iptables("-t", table, "-X", chain)


def restore_host(snapshot: HostSnapshot, *, node_dir: Path, cgroup_root: str, own_chains: tuple[str, ...],
                 bridge: str, own_nft_tables: tuple[str, ...] = ()) -> None:
    """Undo what a real node did, from the snapshot taken before it started.

    Order matters: processes first (so nothing re-creates what is removed), then mounts
    (which frees the pods' network namespaces and their veths), then interfaces, iptables,
    nftables, tunables, cgroups and paths. ``own_nft_tables`` (``"<family> <name>"``) are
    the node's own and go whether or not they existed before (a crashed node's leftovers).
    """
    kill_cgroup_tree(cgroup_root)
    for point in mounts_under(node_dir):
        unmount(point)
    before = set(snapshot.netns)
    for directory in ("/run/netns", "/var/run/netns"):
        with contextlib.suppress(OSError):
            for name in os.listdir(directory):
                if name not in before and name.startswith("cni-"):
                    path = os.path.join(directory, name)
                    unmount(path)
                    with contextlib.suppress(OSError):
                        os.unlink(path)
    if bridge in network_links():
        subprocess.run(["ip", "link", "delete", bridge], capture_output=True, timeout=30)
    # Host-side veths of pods whose namespace is gone disappear with it; any left (a
    # namespace still held open) are removed by name.
    for link in network_links() - set(snapshot.links):
        if link.startswith("veth"):
            subprocess.run(["ip", "link", "delete", link], capture_output=True, timeout=30)
    now = iptables_chains()
    for table, chains in now.items():
        had = set(snapshot.chains.get(table, []))
        for chain in chains:
            if chain in own_chains or (chain not in had and chain.startswith(("CNI-", "KUBE-"))):
                remove_chain(table, chain)
    for table in own_nft_tables:
        delete_nft_table(table)
    for name, value in snapshot.tunables.items():
        if read_tunable(name) != value:
            write_tunable(name, value)
    left = remove_cgroup_tree(cgroup_root)
    if left:
        log.warning("cgroups still busy after the node stopped: %s", ", ".join(left[:5]))
    for path in snapshot.absent_paths:
        for point in mounts_under(path):
            unmount(point)
        if os.path.islink(path):
            os.unlink(path)
        elif os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
    for point in mounts_under(node_dir):
        unmount(point)
    shutil.rmtree(node_dir, ignore_errors=True)
