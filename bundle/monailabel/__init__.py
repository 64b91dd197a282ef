"""The bundle's MONAI Label app (``main.py``) and its infer tasks (``infer_tasks.py``).

They import ``monailabel``, which lives in its own environment (``make label``,
``.venv-label``); this package itself imports nothing so that the main environment can
import ``bundle`` without it. See docs/monailabel.md.
"""
