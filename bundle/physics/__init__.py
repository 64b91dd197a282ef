"""The physics layer: acquisition geometries, projectors (``operators``) and the simulation of measurements.

Nothing here knows about networks, sampling or workflows; ``bundle.recon`` and everything above
import from here, never the other way round.
"""
