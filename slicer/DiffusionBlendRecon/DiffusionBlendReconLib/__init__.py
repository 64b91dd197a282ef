"""The Slicer-independent part of the DiffusionBlendRecon module: the MONAI Label REST client (``client``)."""

from .client import DEFAULT_SERVER, Client, Job, Reconstruction, ServerError, ServerUnreachable, Task, start

__all__ = ["DEFAULT_SERVER", "Client", "Job", "Reconstruction", "ServerError", "ServerUnreachable", "Task", "start"]
