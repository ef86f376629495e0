"""An MCP client nobody here wrote (the Python `mcp` SDK, pinned in .ci/run) against Cascade's
`/mcp`: lists the tools, runs a graph to completion, runs one whose job waits for approval, and
lists the approvals; then follows a slow job (run_slow) past its wait_seconds with get_job and
await_job, runs one twice with the same idempotency key and cancels it. Prints what it saw as
one JSON object for the Rust test to check."""

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

            async def call(name, args):
                r = await session.call_tool(name, args)
                text = [c.text for c in r.content if getattr(c, "type", None) == "text"]
                return {"is_error": bool(r.is_error), "structured": r.structured_content, "text": text}

            for name, args in [
                ("run_quick", {"input": {"n": 7}, "wait_seconds": 20}),
                ("run_gated", {"input": {"amount": 5000}, "wait_seconds": 20}),
                ("list_approvals", {}),
                ("get_job", {"job_id": "not-a-job"}),
            ]:
                out[name] = await call(name, args)

            # A job that outlasts wait_seconds: its id and state, then followed to its end.
            slow = await call("run_slow", {"input": {"n": 1}, "wait_seconds": 0.5})
            out["run_slow"] = slow
            job = (slow["structured"] or {}).get("job_id")
            out["get_job_slow"] = await call("get_job", {"job_id": job})
            out["await_job_slow"] = await call("await_job", {"job_id": job, "wait_seconds": 30})

            # The same idempotency key twice: one job; cancelled while it runs.
            keyed = {"input": {"n": 2}, "wait_seconds": 0, "idempotency_key": "mcp-client-key-1"}
            out["run_slow_keyed"] = [await call("run_slow", keyed), await call("run_slow", keyed)]
            keyed_job = (out["run_slow_keyed"][0]["structured"] or {}).get("job_id")
            out["cancel_job"] = await call("cancel_job", {"job_id": keyed_job})
            out["get_job_cancelled"] = await call("get_job", {"job_id": keyed_job})
            print(json.dumps(out))


asyncio.run(main(sys.argv[1]))
