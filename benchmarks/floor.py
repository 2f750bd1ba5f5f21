"""The floor for exact hits: a minimal aiohttp handler that does one Redis GET.

It returns the stored payload for every POST, doing the least work an HTTP cache in
Python can do (read the body, one GET, write the bytes). The exact-hit benchmark puts
the sidecar beside it in the same run.

Run: ``python -m promptcache.benchmarks.floor --port P --redis-url URL --key K``
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from aiohttp import web

CLIENT = web.AppKey("client", aioredis.Redis)


def build(redis_url: str, key: str) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        payload = await request.app[CLIENT].get(key)
        return web.Response(body=payload, content_type="application/json")

    async def client_ctx(app: web.Application) -> AsyncIterator[None]:
        app[CLIENT] = aioredis.Redis.from_url(redis_url)
        yield
        await app[CLIENT].aclose()

    app = web.Application()
    app.cleanup_ctx.append(client_ctx)
    app.router.add_post("/{tail:.*}", handler)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--key", required=True)
    a = p.parse_args()
    web.run_app(build(a.redis_url, a.key), host="127.0.0.1", port=a.port, print=None,
                access_log=None)


if __name__ == "__main__":
    main()
