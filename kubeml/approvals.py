"""Approvals pinned to content: Ed25519 signatures over (model, version, digest, approver).

An approval is more than a tag: with ``signing.private_key`` set, ``kubeml models approve``
signs the version's registered bundle digest together with its name, number, the approver
and the decision, and stores the signature on the version. With ``signing.public_key`` set,
every deploy path verifies it (:func:`verify_approval`): a tag edited in MLflow, a digest
swapped, or an approval copied onto another version does not verify.

Keys are given by reference, never inline in kubeml.yaml:

- ``file:PATH`` (or ``file://PATH``): a PEM file (PKCS#8 private key, SubjectPublicKeyInfo public key);
- ``env:NAME``: the PEM text in environment variable NAME (a Kubernetes Secret mounted as env).

>>> from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
>>> key = Ed25519PrivateKey.generate()
>>> sig = sign_approval(key, model="digits", version=3, digest="sha256:ab", approver="alice")
>>> check_signature(key.public_key(), sig, model="digits", version=3, digest="sha256:ab", approver="alice")
>>> check_signature(key.public_key(), sig, model="digits", version=4, digest="sha256:ab", approver="alice")
Traceback (most recent call last):
...
kubeml.errors.ApprovalError: the approval signature of digits version 4 does not verify ...
"""

from __future__ import annotations

import base64
import json
from typing import Any

from kubeml._files import read_reference
from kubeml.errors import ApprovalError, ConfigError

__all__ = [
    "SIGNATURE_TAG",
    "check_signature",
    "load_private_key",
    "load_public_key",
    "payload",
    "sign_approval",
]

#: Version tag holding the base64 Ed25519 signature of the approval.
SIGNATURE_TAG = "approval_signature"
#: Bumped if the signed payload's layout changes; part of what is signed.
PAYLOAD_VERSION = "kubeml-approval/1"


def payload(*, model: str, version: int, digest: str, approver: str) -> bytes:
    """The exact bytes an approval signs: canonical JSON, so any field change breaks it."""
    return json.dumps(
        {"kind": PAYLOAD_VERSION, "model": model, "version": int(version), "digest": digest,
         "approver": approver, "decision": "approved"},
        sort_keys=True, separators=(",", ":"),
    ).encode()


def load_private_key(ref: str) -> Any:
    """The Ed25519 private key at ``ref`` (see the module docstring for the forms)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(read_reference(ref, "signing.private_key"), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"signing.private_key {ref!r} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing.private_key {ref!r} is not an Ed25519 key")
    return key


def load_public_key(ref: str) -> Any:
    """The Ed25519 public key at ``ref``."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(read_reference(ref, "signing.public_key"))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"signing.public_key {ref!r} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"signing.public_key {ref!r} is not an Ed25519 key")
    return key


def sign_approval(key: Any, *, model: str, version: int, digest: str, approver: str) -> str:
    """Base64 signature of :func:`payload` with the private ``key``."""
    return base64.b64encode(key.sign(payload(model=model, version=version, digest=digest, approver=approver))).decode()


def check_signature(key: Any, signature: str, *, model: str, version: int, digest: str, approver: str) -> None:
    """Raise :class:`~kubeml.errors.ApprovalError` unless ``signature`` signs this approval."""
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(base64.b64decode(signature, validate=True),
                   payload(model=model, version=version, digest=digest, approver=approver))
    except (InvalidSignature, ValueError) as exc:
        raise ApprovalError(
            f"the approval signature of {model} version {version} does not verify (approver {approver!r}, "
            f"digest {digest}): the approval was not made with the environment's signing key or was "
            "changed since; approve the version again"
        ) from exc
