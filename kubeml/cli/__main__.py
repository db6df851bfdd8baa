"""``python -m kubeml.cli``: the ``kubeml`` command, for environments without the script."""

from kubeml.cli import main

main()
