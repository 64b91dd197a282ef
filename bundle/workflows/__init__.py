"""The workflow layer: what the configs run (inference, evaluation, training) and its handlers and data.

Workflows read files, time and measure, write outputs and talk to MONAI/ignite; the algorithms
they call live in ``bundle.recon`` and the physics in ``bundle.physics``, which never import
from here.
"""
