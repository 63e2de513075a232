"""tests/mcp_server.py's tools served over streamable HTTP, plus `block`, for tests/test_mcp_http.py.

    python tests/mcp_http_server.py PORT [--legacy]

`block` prints ``block started`` on stdout when a call reaches it, then waits forever:
the test reads that line to know the call is in flight before it kills the server.
``--legacy`` refuses ``server/discover``, so that clients connect with the initialize
handshake and a session id (as servers built on the SDK's 1.x do): a restarted server
then no longer knows the session its clients hold.
"""

from __future__ import annotations

import sys

import anyio
from mcp.shared.exceptions import MCPError
from mcp_server import server  # this script's folder is on sys.path
from mcp_types import METHOD_NOT_FOUND, RequestParams


@server.tool()
async def block() -> str:
    """Say that the call started, then never answer."""
    print("block started", flush=True)
    await anyio.sleep_forever()
    return "unreachable"


async def _no_discover(ctx: object, params: RequestParams) -> None:
    raise MCPError(METHOD_NOT_FOUND, "Method not found")


if __name__ == "__main__":
    if "--legacy" in sys.argv:
        server._lowlevel_server.add_request_handler("server/discover", RequestParams, _no_discover)
    server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[1]))
