"""An MCP client nobody here wrote (the Python `mcp` SDK, pinned in .ci/run) against Cascade's
`/mcp`: lists the tools, runs a graph to completion, runs one whose job waits for approval, and
lists the approvals. Prints what it saw as one JSON object for the Rust test to check."""

import asyncio
import json
import sys

from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client


async def main(url: str) -> None:
    async with streamable_http_client(url) as streams:
        read, write = streams[0], streams[1]
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = await session.list_tools()
            out = {"tools": {t.name: t.input_schema for t in tools.tools}}
            for name, args in [
                ("run_quick", {"input": {"n": 7}, "wait_seconds": 20}),
                ("run_gated", {"input": {"amount": 5000}, "wait_seconds": 20}),
                ("list_approvals", {}),
                ("get_job", {"job_id": "not-a-job"}),
            ]:
                r = await session.call_tool(name, args)
                text = [c.text for c in r.content if getattr(c, "type", None) == "text"]
                out[name] = {"is_error": bool(r.is_error), "structured": r.structured_content, "text": text}
            print(json.dumps(out))


asyncio.run(main(sys.argv[1]))
