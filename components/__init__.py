"""KFP v2 components, one folder each.

Each ``component.py`` imports only the standard library and ``kfp`` at module top; the
function body imports ``kubeml`` and calls one stage function in :mod:`kubeml.pipelines.stages`.
On a cluster the components run in the kubeml image (``IMAGE``), which has kubeml
installed; under ``kfp.local`` they run in the current Python environment.
"""

#: Container image of every component on a cluster. The name keeps "python" in it because
#: it is a Python image (kfp.local's subprocess runner checks for that).
IMAGE = "kubeml/kubeml-python:0.1.0"

__all__ = ["IMAGE"]
