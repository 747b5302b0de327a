#!/usr/bin/env python3
"""A delaying TCP relay for the emulated WAN (this kernel has no netem).

The hub namespace REDIRECTs every TCP connection that arrives from a host's link to this
relay; it reads the original destination (SO_ORIGINAL_DST), connects to it, and forwards
each direction's bytes once they are DELAY seconds old. Rate limits are tc tbf on the links
themselves, so bytes really cross a shaped network stack on both sides of the relay.

    relay.py LISTEN_PORT DELAY_MS
"""
import asyncio
import socket
import struct
import sys

SO_ORIGINAL_DST = 80


def original_destination(sock):
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


async def pump(reader, writer, delay):
    """Forwards reader → writer, each chunk DELAY after it arrived, in order."""
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    async def deliver():
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(deliver())
    try:
        while data := await reader.read(1 << 16):
            await queue.put((loop.time() + delay, data))
    except (ConnectionError, OSError):
        pass
    await queue.put((0, None))
    try:
        await sender
    except (ConnectionError, OSError):
        pass


async def handle(client_reader, client_writer, delay):
    sock = client_writer.get_extra_info("socket")
    try:
        host, port = original_destination(sock)
        server_reader, server_writer = await asyncio.open_connection(host, port)
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(
        pump(client_reader, server_writer, delay),
        pump(server_reader, client_writer, delay),
    )


async def main():
    port, delay_ms = int(sys.argv[1]), float(sys.argv[2])
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, delay_ms / 1000.0), "0.0.0.0", port
    )
    print(f"relay on :{port}, one-way delay {delay_ms} ms", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
