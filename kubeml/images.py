"""The container images of kubeml: names, tags and Containerfiles, defined here once.

Three images, built from ``images/<kind>.Containerfile`` (Dockerfile syntax):

``runtime``
    The pipeline components, the Ray trainer and the CLI, with PyTorch and Ray.
``server``
    The model server (``python -m kubeml.serving.server``), without Ray or MLflow's server.
``operator``
    The Tenant operator (``python -m kubeml.operators``): kopf and the Kubernetes client only.

Every reference to them (the components' ``base_image``, the RayJob, the InferenceService
builder, the chart's values and the kustomize overlays) comes from :func:`image_ref`, and a
test holds the chart and overlays to it. On EKS the same Containerfiles are built and pushed
to a registry (ECR); point kubeml at it with ``KUBEML_IMAGE_REGISTRY`` (and
``KUBEML_IMAGE_TAG``), or per call with the ``registry``/``tag`` arguments.

>>> image_ref("operator")
'ghcr.io/kubeml/kubeml:0.1.0'
>>> image_ref("runtime", registry="123456789012.dkr.ecr.us-east-1.amazonaws.com/kubeml", tag="1.2")
'123456789012.dkr.ecr.us-east-1.amazonaws.com/kubeml/kubeml-python:1.2'
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

from kubeml.errors import ConfigError

__all__ = [
    "DEFAULT_REGISTRY",
    "IMAGES",
    "REGISTRY_ENV",
    "TAG_ENV",
    "Image",
    "ImageKind",
    "default_tag",
    "image_ref",
]

ImageKind = Literal["runtime", "server", "operator"]

#: Where the published images live; ``KUBEML_IMAGE_REGISTRY`` overrides it.
DEFAULT_REGISTRY = "ghcr.io/kubeml"
REGISTRY_ENV = "KUBEML_IMAGE_REGISTRY"
TAG_ENV = "KUBEML_IMAGE_TAG"

_REGISTRY = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]+)?(/[a-z0-9]([a-z0-9._-]*[a-z0-9])?)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class Image:
    kind: ImageKind
    name: str
    """Repository name under the registry."""
    containerfile: str
    """Path of its Containerfile, relative to the repository root."""
    description: str


IMAGES: dict[str, Image] = {
    # "python" stays in the runtime's name: kfp.local's subprocess runner warns about a
    # component whose base image does not look like a Python image.
    "runtime": Image("runtime", "kubeml-python", "images/runtime.Containerfile",
                     "pipeline components, Ray trainer and CLI, with PyTorch and Ray"),
    "server": Image("server", "kubeml-server", "images/server.Containerfile",
                    "the model server (KServe V2 REST and gRPC)"),
    "operator": Image("operator", "kubeml", "images/operator.Containerfile",
                      "the Tenant operator: kopf and the Kubernetes client, no PyTorch, no Ray"),
}


def default_tag() -> str:
    """The package version: images and code move together."""
    from kubeml import __version__

    return __version__


def image_ref(kind: str, *, registry: str | None = None, tag: str | None = None) -> str:
    """``<registry>/<name>:<tag>`` of image ``kind`` (``runtime``, ``server``, ``operator``)."""
    try:
        image = IMAGES[kind]
    except KeyError:
        raise ConfigError(f"unknown image {kind!r}; kubeml has {', '.join(IMAGES)}") from None
    registry = (registry or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY).rstrip("/")
    tag = tag or os.environ.get(TAG_ENV) or default_tag()
    if not _REGISTRY.fullmatch(registry):
        raise ConfigError(f"image registry {registry!r} is not a valid registry/repository prefix "
                          "(lower-case host[:port]/path, e.g. 123456789012.dkr.ecr.us-east-1.amazonaws.com/kubeml)")
    if not _TAG.fullmatch(tag):
        raise ConfigError(f"image tag {tag!r} is not valid: letters, digits, '_', '.', '-' (at most 128, "
                          "not starting with '.' or '-')")
    return f"{registry}/{image.name}:{tag}"
