"""Bounded load test of ``fastpadim serve`` on loopback: N concurrent clients for a fixed time.

Starts the service on MODEL (a subprocess bound to 127.0.0.1 on a free port), then each client posts images
(multipart, as a line PC would) back to back. Reports requests/s, p50/p99 latency and errors (must be 0).

    python benchmarks/load_test.py MODEL IMAGES_DIR [--clients 8] [--seconds 30] [--max-batch 8] [--max-wait-ms 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(model: Path, port: int, max_batch: int, max_wait_ms: float) -> subprocess.Popen:
    command = [sys.executable, "-c", "from fastpadim.cli import main; main()", "serve", str(model), "--host",
               "127.0.0.1", "--port", str(port), "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
    return subprocess.Popen(command, env=os.environ.copy())


async def wait_ready(base: str, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"the service exited with code {process.returncode}")
            try:
                if (await http.get(base + "/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.25)
    raise SystemExit("the service did not start in time")


async def client(http: httpx.AsyncClient, url: str, images: list[tuple[str, bytes]], offset: int, stop_at: float,
                 latencies: list[float], errors: list[str], batch_sizes: list[int]) -> None:
    i = offset
    while time.perf_counter() < stop_at:
        name, data = images[i % len(images)]
        i += 1
        start = time.perf_counter()
        try:
            reply = await http.post(url, files={"file": (name, data, "image/png")})
            if reply.status_code == 200:
                latencies.append(time.perf_counter() - start)
                batch_sizes.append(reply.json()["batch_size"])
            else:
                errors.append(f"{reply.status_code}: {reply.text[:200]}")
        except httpx.HTTPError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")


async def run(args) -> int:
    images = [(p.name, p.read_bytes()) for p in sorted(Path(args.images).rglob("*.png"))]
    if not images:
        raise SystemExit(f"no PNG images in {args.images}")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = start_service(Path(args.model), port, args.max_batch, args.max_wait_ms)
    try:
        await wait_ready(base, process)
        latencies: list[float] = []
        errors: list[str] = []
        batch_sizes: list[int] = []
        limits = httpx.Limits(max_connections=args.clients)
        async with httpx.AsyncClient(limits=limits, timeout=120.0) as http:
            # Warm-up outside the measured window (connection set-up, first batches).
            await asyncio.gather(*(client(http, base + "/v1/score", images, k, time.perf_counter() + 2.0, [], [], [])
                                   for k in range(args.clients)))
            start = time.perf_counter()
            stop_at = start + args.seconds
            await asyncio.gather(*(client(http, base + "/v1/score", images, k * 7, stop_at, latencies, errors,
                                          batch_sizes) for k in range(args.clients)))
            elapsed = time.perf_counter() - start
            health = (await http.get(base + "/health")).json()
    finally:
        process.terminate()
        process.wait(timeout=30)
    ms = np.asarray(latencies) * 1000.0
    print(f"clients {args.clients}, {args.seconds:.0f} s, max batch {args.max_batch}, max wait {args.max_wait_ms} ms, "
          f"{len(images)} distinct images")
    print(f"requests   {len(latencies)} ok, {len(errors)} errors")
    if len(ms):
        print(f"throughput {len(latencies) / elapsed:.1f} requests/s")
        print(f"latency    p50 {np.percentile(ms, 50):.0f} ms, p99 {np.percentile(ms, 99):.0f} ms, max {ms.max():.0f} ms")
        print(f"batches    mean size {np.mean(batch_sizes):.1f}, largest {health['largest_batch']}")
    for error in errors[:5]:
        print("error:", error)
    return 1 if errors or not len(ms) else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("images", help="folder of PNG images to post (searched recursively)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    sys.exit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
