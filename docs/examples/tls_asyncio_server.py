"""An asyncio TLS server whose sessions are shared through distcache.

Run two of them on different ports with the same --cache: a client that made its session with
one resumes it on the other.  (See docs/tls.md.)

    dc_server -listen UNIX:/tmp/scache &
    python tls_asyncio_server.py --cert cert.pem --key key.pem --cache UNIX:/tmp/scache --port 8443 &
    python tls_asyncio_server.py --cert cert.pem --key key.pem --cache UNIX:/tmp/scache --port 8444 &
"""

import argparse
import asyncio
import logging
import ssl

import tcpha.tls


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while (await reader.readline()).strip():   # read the request head up to the empty line
            pass
        reused = writer.get_extra_info("ssl_object").session_reused
        body = f"hello from port {writer.get_extra_info('sockname')[1]}, session reused: {reused}\n"
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body.encode()))
        await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()   # asyncio sends close_notify


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--cache", default="UNIX:/run/tcpha/scache", help="distcache address")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8443)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    # Before the first connection.  False (and one log line) means: works, but unshared.
    tcpha.tls.share_sessions(context, args.cache, timeout=0.2)

    server = await asyncio.start_server(handle, args.host, args.port, ssl=context)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"serving on https://{host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
