"""The benchmark's baseline: an aiohttp handler that answers 200 and does nothing else.

Served exactly as the edge is (same loop, no access log) so the ratio measures the edge's own work.
"""

from __future__ import annotations

import argparse

from aiohttp import web


async def noop(request: web.Request) -> web.Response:
    """200, empty JSON object."""
    return web.Response(body=b"{}", content_type="application/json")


def main() -> None:
    """``python -m devtools.noop_server --port P``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--no-uvloop", dest="uvloop", action="store_false")
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1,
                        help="processes sharing the port (SO_REUSEPORT), as `ingest --workers`")
    args = parser.parse_args()
    if args.workers > 1:
        import os
        import signal
        import subprocess
        import sys

        cmd = [sys.executable, "-m", "devtools.noop_server", "--host", args.host, "--port", str(args.port),
               "--reuse-port", *([] if args.uvloop else ["--no-uvloop"])]
        children = [subprocess.Popen(cmd) for _ in range(args.workers)]
        signal.signal(signal.SIGTERM, lambda *_: [c.terminate() for c in children])
        for child in children:
            child.wait()
        os._exit(0)
    if args.uvloop:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
    app = web.Application()
    app.router.add_get("/v1/keyyo/{tenant}/notifications", noop)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None,
                reuse_port=args.reuse_port or None)


if __name__ == "__main__":
    main()
