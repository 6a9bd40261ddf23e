#!/usr/bin/env python3
"""A scripted OpenAI-compatible server for testing `ernie bench serve`: every streamed response
waits TTFT, then sends `max_tokens` chunks ITL apart, then usage and [DONE]. Prints its port.
With a third argument, appends each request body it gets to that file, one JSON per line."""
import asyncio
import json
import sys

TTFT = float(sys.argv[1]) if len(sys.argv) > 1 else 0.2
ITL = float(sys.argv[2]) if len(sys.argv) > 2 else 0.05
PROMPT_TOKENS = 123
BODIES = sys.argv[3] if len(sys.argv) > 3 else None


async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = 0
            for h in lines[1:]:
                if h.lower().startswith("content-length:"):
                    length = int(h.split(":", 1)[1])
            body = json.loads(await reader.readexactly(length)) if length else {}
            if path == "/v1/models":
                data = json.dumps({"object": "list", "data": [{"id": "mock", "root": "mock"}]}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
                await writer.drain()
                continue
            if BODIES:
                with open(BODIES, "a") as f:
                    f.write(json.dumps(body) + "\n")
            chat = path.endswith("chat/completions")
            n = body.get("max_completion_tokens" if chat else "max_tokens", 1)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")

            async def event(obj):
                payload = ("data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n").encode()
                writer.write(b"%x\r\n" % len(payload) + payload + b"\r\n")
                await writer.drain()

            await asyncio.sleep(TTFT)
            for i in range(n):
                if i:
                    await asyncio.sleep(ITL)
                choice = {"index": 0, "delta": {"content": "x"}} if chat else {"index": 0, "text": "x"}
                await event({"id": "m", "choices": [choice]})
            await event({"id": "m", "choices": [], "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n,
                                                           "total_tokens": PROMPT_TOKENS + n}})
            await event("[DONE]")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[4]) if len(sys.argv) > 4 else 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
