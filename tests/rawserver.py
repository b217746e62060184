"""A raw-bytes HTTP server for the fuzz tests, run as its own process so that its
allocations never count in the client's measured memory.

``POST /__answer`` stores a raw HTTP answer (status line, headers, body: free to lie
about everything); every other request gets that answer written as is, then the
connection is closed. ``POST /__answer?split=N&pause=S`` writes the first ``N`` bytes,
waits ``S`` seconds, then writes the rest (one answer in two TCP segments). Prints
``rawserver: listening on http://127.0.0.1:PORT/``.

    python tests/rawserver.py
"""

from __future__ import annotations

import asyncio
import sys

LISTENING = "rawserver: listening on "


class _State:
    answer = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    split = 0
    pause = 0.0


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    line = head.split(b"\r\n", 1)[0]
    length = 0
    for h in head.split(b"\r\n")[1:]:
        name, _, value = h.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    return line, body


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        line, body = await _read_request(reader)
        if b" /__answer" in line:
            _State.answer = body
            target = line.split(b" ")[1].decode()
            query = dict(kv.split("=", 1) for kv in target.partition("?")[2].split("&") if "=" in kv)
            _State.split = int(query.get("split", 0))
            _State.pause = float(query.get("pause", 0))
            writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        elif _State.split:
            writer.write(_State.answer[: _State.split])
            await writer.drain()
            await asyncio.sleep(_State.pause)
            writer.write(_State.answer[_State.split :])
        else:
            writer.write(_State.answer)
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(_serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(f"{LISTENING}http://127.0.0.1:{port}/", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
