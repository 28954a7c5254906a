"""A minimal sipbridge agent (native protocol, docs/agent-protocol.md) that hands every
caller to a person: after `start` it waits TRANSFER_AFTER_S seconds (default 0), asks
for a transfer to TRANSFER_TO — `blind` (a REFER to the carrier; the default) or, with
TRANSFER_MODE=bridge, `bridge` (the daemon calls the person itself through the tenant's
transfer trunk and joins the legs) — and reports each `transfer` step on stdout as a
JSON line. A `failed` transfer leaves the caller with the agent: this one then says so
with a 440 Hz beep (a real agent would speak) and keeps listening until `stop`.

Run it with the `websockets` package (installed into the test venv by
scripts/install-test-deps.sh):

    AGENT_PORT=9000 TRANSFER_TO=tel:+15557654321 python examples/transfer_agent.py

and point a tenant at it: `pipeline = { kind = "agent", url = "ws://127.0.0.1:9000/" }`.
It prints `listening <port>` once it accepts connections (port 0 picks a free one).
"""

import asyncio
import json
import math
import os
import struct

from websockets.asyncio.server import serve

TRANSFER_TO = os.environ.get("TRANSFER_TO", "tel:+15557654321")
TRANSFER_AFTER_S = float(os.environ.get("TRANSFER_AFTER_S", "0"))
TRANSFER_MODE = os.environ.get("TRANSFER_MODE", "blind")


def beep(rate: int, seconds: float = 0.5, freq: float = 440.0) -> bytes:
    """16-bit little-endian mono PCM at `rate`."""
    n = int(rate * seconds)
    return b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * freq * i / rate))) for i in range(n)
    )


def report(**fields) -> None:
    print(json.dumps(fields), flush=True)


async def call(ws) -> None:
    rate = 16000
    async for message in ws:
        if isinstance(message, bytes):
            continue  # caller audio: a real agent would transcribe it
        event = json.loads(message)
        kind = event.get("event")
        if kind == "start":
            rate = event.get("sample_rate", rate)
            report(call=event["call_id"], started=True)
            await asyncio.sleep(TRANSFER_AFTER_S)
            await ws.send(json.dumps({"event": "transfer", "to": TRANSFER_TO, "mode": TRANSFER_MODE}))
        elif kind == "transfer":
            report(transfer=event["result"], status=event.get("status"),
                   reason=event.get("reason"), to=event["to"])
            if event["result"] == "failed":
                # The caller is still ours: tell them.
                await ws.send(beep(rate))
        elif kind == "stop":
            report(stopped=True)


async def main() -> None:
    port = int(os.environ.get("AGENT_PORT", "0"))
    async with serve(call, "127.0.0.1", port) as server:
        bound = server.sockets[0].getsockname()[1]
        print(f"listening {bound}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
