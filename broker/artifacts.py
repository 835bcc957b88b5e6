"""A small HTTP server for input bundles in the local setup: a folder served read-only.

Production puts inputs in object storage behind presigned URLs; the agent only
sees URLs and digests, so it does not change.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from aiohttp import web

from fairu.logs import configure_logging

logger = logging.getLogger(__name__)


def make_app(root: Path) -> web.Application:
    app = web.Application()
    app.router.add_static("/", root, show_index=False, follow_symlinks=False)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fairu-artifacts", description="Serve a folder of input bundles over HTTP."
    )
    parser.add_argument("--root", type=Path, required=True, help="folder to serve")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8470, help="TCP port (default 8470)")
    args = parser.parse_args(argv)
    configure_logging()
    if not args.root.is_dir():
        print(f"fairu-artifacts: error: {args.root} is not a folder", file=sys.stderr)
        return 2
    if not 0 < args.port < 65536:
        print(f"fairu-artifacts: error: invalid port {args.port}", file=sys.stderr)
        return 2
    logger.info("serving %s on http://%s:%d/", args.root, args.host, args.port)
    try:
        web.run_app(make_app(args.root.resolve()), host=args.host, port=args.port, print=None)
    except OSError as exc:
        print(f"fairu-artifacts: error: cannot listen on {args.host}:{args.port}: "
              f"{exc.strerror}; choose another --port", file=sys.stderr)
        return 1
    logger.info("artifact server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
