"""A small MCP server for tests/test_mcp.py, built with the official SDK (mcp 2.x).

Run over stdio (the default) or streamable HTTP:

    python tests/mcp_server.py
    python tests/mcp_server.py --http --port 8765
"""

from __future__ import annotations

import argparse
import time

import anyio
from mcp.server.mcpserver import Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("loopwise-test-server", log_level="WARNING")

CUSTOMERS = {"C-1": {"name": "Ada", "plan": "pro"}, "C-2": {"name": "Grace", "plan": "free"}}


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def lookup(customer_id: str) -> str:
    """Look up a customer by id."""
    customer = CUSTOMERS.get(customer_id)
    if customer is None:
        raise ToolError(f"no customer {customer_id}")
    return f"{customer['name']} ({customer['plan']} plan)"


@server.tool()
def fail() -> str:
    """Always fails."""
    raise ToolError("the database is on fire")


@server.tool()
async def hang(seconds: float) -> str:
    """Sleep (cancellably), then answer."""
    await anyio.sleep(seconds)
    return f"slept {seconds}"


@server.tool()
def freeze(seconds: float) -> str:
    """Block the server's whole event loop: it answers nothing, not even a cancel."""
    time.sleep(seconds)
    return f"froze {seconds}"


@server.tool(name="dotted.name")
def dotted() -> str:
    """A tool whose name is not a valid OpenAI function name."""
    return "dotted ok"


@server.tool()
def pixel() -> Image:
    """Return a 1x1 PNG image."""
    return Image(data=b"\x89PNG\r\n\x1a\n" + b"\0" * 16, format="png")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", action="store_true", help="serve streamable HTTP instead of stdio")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    if args.http:
        server.run("streamable-http", host="127.0.0.1", port=args.port)
    else:
        server.run()


if __name__ == "__main__":
    main()
