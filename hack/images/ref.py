"""Prints ``kubeml.images.image_ref(KIND)``: the build script's names come from that one place.

Runs on any Python 3.11 from the repository root, without kubeml installed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kubeml.images import image_ref  # noqa: E402

print(image_ref(sys.argv[1]))
