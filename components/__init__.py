"""KFP v2 components, one folder each.

Each ``component.py`` imports only the standard library and ``kfp`` at module top; the
function body imports ``kubeml`` and calls one stage function in :mod:`kubeml.pipelines.stages`.
On a cluster the components run in the kubeml image (``IMAGE``), which has kubeml
installed; under ``kfp.local`` they run in the current Python environment.
"""

from kubeml.images import image_ref

#: Container image of every component on a cluster: the runtime image
#: (``images/runtime.Containerfile``); ``kubeml pipeline compile --image`` replaces it in the
#: compiled pipeline.
IMAGE = image_ref("runtime")

__all__ = ["IMAGE"]
