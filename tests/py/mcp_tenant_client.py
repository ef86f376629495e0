"""The Python `mcp` SDK (pinned in .ci/run) against Cascade's `/mcp` as one tenant's key:
lists the tools it is offered, runs a graph, and asks for another tenant's job. Prints what it
saw as one JSON object for the Rust test to check.

usage: mcp_tenant_client.py URL KEY FOREIGN_JOB_ID"""

import asyncio
import json
import sys

from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


async def main(url: str, key: str, foreign: str) -> None:
    client = create_mcp_http_client(headers={"Authorization": f"Bearer {key}"})
    async with client:
        async with streamable_http_client(url, http_client=client) as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write) as session:
                await session.initialize()
                tools = await session.list_tools()
                out = {"tools": sorted(t.name for t in tools.tools)}
                for name, args in [
                    ("run_quick", {"input": {"n": 2}, "wait_seconds": 20}),
                    ("get_job", {"job_id": foreign}),
                    ("cancel_job", {"job_id": foreign}),
                    ("run_ledger", {"input": {}, "wait_seconds": 1}),
                ]:
                    r = await session.call_tool(name, args)
                    text = [c.text for c in r.content if getattr(c, "type", None) == "text"]
                    out[name] = {"is_error": bool(r.is_error), "structured": r.structured_content, "text": text}
                print(json.dumps(out))


asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
