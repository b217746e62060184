"""An independent, minimal remote-VAE endpoint for client benchmarks: ``python bench/fastserver.py``.

It shares no code with asyncvae (plain asyncio protocols, no aiohttp, no asyncvae
import) and does no work per request beyond HTTP/1.1 framing: each decode request
(``output_type=pt&partial_postprocess=True``, shape ``[B,C,h,w]`` or video
``[B,C,T,h,w]``) is answered with zeros of the uint8 shape the protocol promises
(``[B, 8h, 8w, 3]``; video ``[F, 8h, 8w, 3]``), from a cache of prebuilt answers. So
a client benchmark against it measures the clients, not a server's Python.

Prints ``fastserver: listening on http://127.0.0.1:PORT/``. Uses uvloop when installed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from urllib.parse import parse_qs

LISTENING = "fastserver: listening on "
_ANSWERS: dict[bytes, bytes] = {}


def _answer(target: bytes) -> bytes:
    got = _ANSWERS.get(target)
    if got is not None:
        return got
    query = parse_qs(target.partition(b"?")[2].decode())
    shape = [int(s) for s in query.get("shape", ["1", "4", "8", "8"])]
    if len(shape) == 5:
        out = [(shape[2] - 1) * 4 + 1, shape[3] * 8, shape[4] * 8, 3]
    else:
        out = [shape[0], shape[-2] * 8, shape[-1] * 8, 3]
    n = out[0] * out[1] * out[2] * out[3]
    head = (
        "HTTP/1.1 200 OK\r\nContent-Type: tensor/binary\r\n"
        f"shape: {json.dumps(out)}\r\ndtype: uint8\r\nContent-Length: {n}\r\n\r\n"
    ).encode()
    got = _ANSWERS[target] = head + bytes(n)
    return got


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.need = -1
        self.target = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.need < 0:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buf[:end])
                del self.buf[: end + 4]
                lines = head.split(b"\r\n")
                self.target = lines[0].split(b" ")[1]
                self.need = 0
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        self.need = int(value)
            if len(self.buf) < self.need:
                return
            del self.buf[: self.need]
            self.need = -1
            self.transport.write(_answer(self.target))  # type: ignore[attr-defined]


async def main() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Conn, "127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    port = server.sockets[0].getsockname()[1]
    print(f"{LISTENING}http://127.0.0.1:{port}/", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
