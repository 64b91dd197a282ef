"""Start the bundle's MONAI Label server, bound to 127.0.0.1 unless told otherwise.

    .venv-label/bin/python -m bundle.monailabel --studies <folder> [--port 8000] [--host 127.0.0.1]
        [--conf key value ...] [any other option of `monailabel start_server`]

This is ``monailabel start_server --app <this folder>`` with two safer defaults: the host is
127.0.0.1 (MONAI Label's own default is 0.0.0.0, every interface) and MONAI Label's session
uploads are off (``MONAI_LABEL_SESSIONS=false``; set the variable to override). See
docs/monailabel.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent


def build_argv(argv: list[str]) -> list[str]:
    """The ``monailabel`` command line for our arguments (unknown options pass through)."""
    parser = argparse.ArgumentParser(prog="python -m bundle.monailabel", description=__doc__.split("\n\n")[0])
    parser.add_argument("-s", "--studies", required=True, help="folder of studies (or a DICOMweb URL)")
    parser.add_argument("-i", "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("-p", "--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("-a", "--app", default=str(APP_DIR), help="the app folder (default: this bundle's)")
    parser.add_argument(
        "-c", "--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help="app setting"
    )
    args, rest = parser.parse_known_args(argv)
    out = ["monailabel", "start_server", "--app", args.app, "--studies", args.studies]
    out += ["--host", args.host, "--port", str(args.port)]
    for key, value in args.conf:
        out += ["--conf", key, value]
    return out + rest


def main(argv: list[str] | None = None) -> None:
    """Run the MONAI Label server in this process (it returns when the server stops)."""
    sys.argv = build_argv(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("MONAI_LABEL_SESSIONS", "false")
    from monailabel.main import Main  # after the environment: MONAI Label reads it on import

    Main().run()


if __name__ == "__main__":
    main()
