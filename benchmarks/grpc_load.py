"""A closed-loop load generator for KServe v2 over gRPC, the counterpart of wrk for
bench_serve.py: ``connections`` channels (each its own TCP connection, so that the server's
worker processes share them as they share wrk's), one call in flight on each, the same
serialized ``ModelInfer`` request every time, for ``seconds``. Prints one JSON line: requests
per second, p50 and p99 latency in ms, errors, and this process's CPU ms per request.

    python benchmarks/grpc_load.py ADDRESS REQUEST_FILE CONNECTIONS SECONDS
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import grpc
import numpy as np

METHOD = "/inference.GRPCInferenceService/ModelInfer"


async def _client(
    address: str, request: bytes, start: float, until: float, latencies: list[float]
) -> tuple[int, int]:
    """(calls answered, errors)."""
    calls = errors = 0
    # a channel of its own, not one shared subchannel: one TCP connection per client
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        call = channel.unary_unary(METHOD)  # bytes in, bytes out: no (de)serializing here
        await call(request, timeout=10)  # connected and warm before the clock starts
        while (sent := time.perf_counter()) < until:
            try:
                await call(request, timeout=10)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            calls += 1
            if sent >= start:  # the calls of the first second only warm up
                latencies.append(time.perf_counter() - sent)
    return calls, errors


async def main(address: str, request: bytes, connections: int, seconds: float) -> None:
    latencies: list[float] = []
    start = time.perf_counter() + 1.0  # a second to connect and warm up
    until = start + seconds
    cpu = time.process_time()
    counts = await asyncio.gather(
        *(_client(address, request, start, until, latencies) for _ in range(connections))
    )
    ms = np.array(latencies) * 1e3
    calls = sum(c for c, _ in counts)
    print(
        json.dumps(
            {
                # every call answered, the warm-up's too: the CPU time per request is over them
                "requests": calls,
                "rps": len(latencies) / seconds,
                "p50": float(np.percentile(ms, 50)),
                "p99": float(np.percentile(ms, 99)),
                "errors": sum(e for _, e in counts),
                "client_cpu_ms": (time.process_time() - cpu) * 1e3 / max(calls, 1),
            }
        )
    )


if __name__ == "__main__":
    address, path, n, secs = sys.argv[1:5]
    asyncio.run(main(address, Path(path).read_bytes(), int(n), float(secs)))
