"""A TCP forwarder: ``python -m kubeml.testing.cluster._forward LISTEN_HOST:PORT TARGET_HOST:PORT``.

The real node's pods reach the apiserver through the ``kubernetes`` Service, whose endpoint
is the pod bridge's address; the apiserver itself listens on loopback only. This process
listens on the bridge address and relays each connection to the apiserver, byte for byte
(TLS stays end to end between the pod and the apiserver). The iptables alternative, a DNAT
to 127.0.0.1, would need ``route_localnet`` and would race kube-proxy's own rules for the
same Service.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _serve(listen: tuple[str, int], target: tuple[str, int]) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*target), timeout=5)
        except (OSError, asyncio.TimeoutError):
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(handle, *listen, reuse_address=True)
    print(f"forwarding {listen[0]}:{listen[1]} -> {target[0]}:{target[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m kubeml.testing.cluster._forward LISTEN_HOST:PORT TARGET_HOST:PORT", file=sys.stderr)
        return 2
    asyncio.run(_serve(_address(argv[0]), _address(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
