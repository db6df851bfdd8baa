"""The one place kubeml imports kserve.

``kserve.model_server`` parses ``sys.argv`` when it is imported and bakes the result into
``ModelServer``'s defaults, so importing kserve inside any process whose command line
happens to contain ``--http_port``, ``--model_name``, ``--protocol x`` (or an abbreviation
argparse accepts) would silently change, or abort, that process. The import below runs
with a bare command line; every setting kubeml cares about is then passed explicitly.
"""

from __future__ import annotations

import sys

_argv = sys.argv
sys.argv = _argv[:1]
try:
    import kserve
    from kserve import InferOutput, InferRequest, InferResponse, ModelServer
    from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady
    from kserve.model_repository import ModelRepository
    from kserve.protocol.dataplane import DataPlane
finally:
    sys.argv = _argv

__all__ = [
    "DataPlane",
    "InferOutput",
    "InferRequest",
    "InferResponse",
    "InvalidInput",
    "ModelNotFound",
    "ModelNotReady",
    "ModelRepository",
    "ModelServer",
    "kserve",
]
