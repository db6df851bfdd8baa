"""A cluster someone else runs (kind, EKS), reached through ``KUBECONFIG``.

Offers the same surface the tests use on a local :class:`~kubeml.testing.cluster.Cluster`
(``admin_kubeconfig``, ``kubeconfig_for``, ``api_client``), so one test suite runs on both.
User credentials come from the CertificateSigningRequest API with the
``kubernetes.io/kube-apiserver-client`` signer, which kind and kubeadm clusters honour.
EKS does not issue client certificates that way; there ``kubeconfig_for`` raises and the
tests that need tenant users are skipped by the fixture's caller.
"""

from __future__ import annotations

import base64
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kubeml.errors import ClusterError
from kubeml.testing.cluster._kubeconfig import write_kubeconfig

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

__all__ = ["ExistingCluster"]

# Long enough for a test session, short enough that a leaked kubeconfig soon stops working.
_CERT_LIFETIME_S = 3600
_SIGN_TIMEOUT_S = 30.0


class ExistingCluster:
    """Handle on the cluster of a kubeconfig's current context."""

    def __init__(self, kubeconfig: str | Path, *, work_dir: str | Path):
        self.admin_kubeconfig = Path(kubeconfig).expanduser()
        if not self.admin_kubeconfig.is_file():
            raise ClusterError(
                f"KUBECONFIG points at {self.admin_kubeconfig}, which does not exist; "
                "point it at the cluster's kubeconfig or unset KUBEML_TEST_CLUSTER"
            )
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config = yaml.safe_load(self.admin_kubeconfig.read_text()) or {}
        context_name = config.get("current-context")
        context = _named(config.get("contexts", []), context_name)["context"]
        cluster = _named(config.get("clusters", []), context["cluster"])["cluster"]
        self.name = str(context["cluster"])
        self.server = str(cluster["server"])
        if "certificate-authority-data" in cluster:
            self._ca_pem = base64.b64decode(cluster["certificate-authority-data"])
        elif "certificate-authority" in cluster:
            self._ca_pem = Path(cluster["certificate-authority"]).expanduser().read_bytes()
        else:
            raise ClusterError(f"kubeconfig {self.admin_kubeconfig} has no CA for {self.name!r}")

    @classmethod
    def from_env(cls, *, work_dir: str | Path) -> ExistingCluster:
        kubeconfig = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
        if not kubeconfig:
            kubeconfig = str(Path.home() / ".kube" / "config")
        return cls(kubeconfig, work_dir=work_dir)

    def api_client(self, user: str | None = None, groups: tuple[str, ...] | list[str] = ()) -> ApiClient:
        from kubernetes import config

        path = self.admin_kubeconfig if user is None else self.kubeconfig_for(user, groups)
        return config.new_client_from_config(config_file=str(path))

    def kubeconfig_for(self, user: str, groups: tuple[str, ...] | list[str] = ()) -> Path:
        """Have the cluster sign a client certificate for ``user`` in ``groups``."""
        from kubernetes.client import CertificatesV1Api, V1CertificateSigningRequest
        from kubernetes.client.exceptions import ApiException

        key = ec.generate_private_key(ec.SECP256R1())
        subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
        subject.append(x509.NameAttribute(NameOID.COMMON_NAME, user))
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject)).sign(key, hashes.SHA256())
        name = f"kubeml-{re.sub(r'[^a-z0-9-]', '-', user.lower())}-{os.urandom(3).hex()}"
        body = V1CertificateSigningRequest(
            metadata={"name": name},
            spec={
                "request": base64.b64encode(csr.public_bytes(serialization.Encoding.PEM)).decode(),
                "signerName": "kubernetes.io/kube-apiserver-client",
                "expirationSeconds": _CERT_LIFETIME_S,
                "usages": ["client auth"],
            },
        )
        with self.api_client() as client:
            api = CertificatesV1Api(client)
            try:
                api.create_certificate_signing_request(body)
                approval = api.read_certificate_signing_request(name)
                approval.status.conditions = [
                    {"type": "Approved", "status": "True", "reason": "KubemlTest",
                     "message": "issued for an integration test"}
                ]
                api.replace_certificate_signing_request_approval(name, approval)
                deadline = time.monotonic() + _SIGN_TIMEOUT_S
                while time.monotonic() < deadline:
                    issued = api.read_certificate_signing_request(name).status.certificate
                    if issued:
                        break
                    time.sleep(0.2)
                else:
                    raise ClusterError(
                        f"the cluster did not sign CSR {name} within {_SIGN_TIMEOUT_S:.0f} s; "
                        "its kube-controller-manager may lack a cluster-signing key (EKS does "
                        "not sign kube-apiserver-client certificates)"
                    )
            except ApiException as exc:
                raise ClusterError(f"could not issue a client certificate for {user!r}: {exc.reason}") from exc
            finally:
                try:
                    api.delete_certificate_signing_request(name)
                except ApiException:
                    pass
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        path = self.work_dir / f"user-{name}.kubeconfig"
        return write_kubeconfig(path, cluster_name=self.name, server=self.server, ca_pem=self._ca_pem,
                                user=user, cert_pem=base64.b64decode(issued), key_pem=key_pem)


def _named(items: list[dict[str, Any]], name: str | None) -> dict[str, Any]:
    for item in items:
        if item.get("name") == name:
            return item
    raise ClusterError(f"kubeconfig has no entry named {name!r}")
