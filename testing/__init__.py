"""kubeml.testing: the test harness that ships with kubeml (like ``kopf.testing``).

- :mod:`kubeml.testing.cluster`: a real Kubernetes control plane on localhost (etcd,
  apiserver, controller-manager, scheduler from Go modules; kwok nodes), or an existing
  cluster through ``KUBECONFIG``; pytest fixtures in :mod:`kubeml.testing.cluster.fixtures`.
- :mod:`kubeml.testing.operators`: the Tenant operator run in-process against any cluster.
- :mod:`kubeml.testing.serving`: real model bundles and model servers for one block.

Only ``tests/``, ``benchmarks/`` and the ``kubeml cluster`` command import it; nothing
in the product does (an import-linter contract checks it). It is the only package that may
import pytest. Submodules are imported on demand: importing this package starts nothing.
"""

__all__: list[str] = []
