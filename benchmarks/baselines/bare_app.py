"""The ceiling bench_serve.py measures convserve against: a bare ASGI app under uvicorn, with
no framework, that reads the whole request body and answers a constant of the same shape as
convserve's answer. With as many worker processes as convserve, nothing served over uvicorn
can answer more requests than this.

    uvicorn bare_app:app --app-dir benchmarks/baselines --workers 2
"""

from __future__ import annotations

import json
from typing import Any

ANSWER = json.dumps(
    {
        "predictions": [
            {
                "top_k": [{"label": str(i), "probability": 0.1} for i in range(5)],
                "probabilities": {str(i): 0.1 for i in range(10)},
            }
        ]
    }
).encode()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


async def lifespan(receive: Any, send: Any) -> None:
    """The ASGI lifespan protocol, with nothing to start or stop."""
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    more = True
    while more:  # the whole body, as a server that uses it must read it
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})
