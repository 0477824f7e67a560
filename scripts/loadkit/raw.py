"""The raw client limit: an aiormq + uvloop consumer that only parses the JSON and acks.

``python -m loadkit.raw URL COUNT PREFETCH`` consumes COUNT messages from
``alerts`` and prints one JSON line: the time and its own CPU from the first
delivery to the last ack. :func:`measure_raw` fills a fresh vhost with the
same alert bodies as the alertd runs (same quorum queue and topology), then
runs that consumer as a subprocess.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

RAW_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class RawResult:
    messages: int
    prefetch: int
    seconds: float
    per_s: float
    cpu_ms_per_message: float
    broker_ms_per_message: float
    repeat: int = 1  # which of --repeat's raw runs of this prefetch


async def _consume(url: str, count: int, prefetch: int) -> dict[str, float]:
    import aiormq

    connection = await aiormq.connect(url)
    channel = await connection.channel()
    await channel.basic_qos(prefetch_count=prefetch)
    done = asyncio.Event()
    state = {"n": 0, "t0": 0.0, "cpu0": 0.0, "t1": 0.0, "cpu1": 0.0}

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        if state["n"] == 0:
            times = os.times()
            state["t0"], state["cpu0"] = time.time(), times.user + times.system
        alert = orjson.loads(message.body)
        if not alert.get("alert_id"):
            raise ValueError("not an alert")
        assert message.delivery_tag is not None
        await message.channel.basic_ack(message.delivery_tag)
        state["n"] += 1
        if state["n"] == count:
            times = os.times()
            state["t1"], state["cpu1"] = time.time(), times.user + times.system
            done.set()

    await channel.basic_consume("alerts", on_message, no_ack=False)
    await done.wait()
    await connection.close()
    return state


def main() -> None:
    import uvloop

    url, count, prefetch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    state = uvloop.run(_consume(url, count, prefetch))
    print(orjson.dumps(state).decode(), flush=True)


def measure_raw(amqp_url: str, bodies: list[bytes], prefetch: int) -> RawResult:
    """Publish ``bodies`` (confirmed), then time the raw consumer over all of them."""
    from loadkit.proctree import cpu_sample
    from loadkit.publisher import prefill

    prefill(amqp_url, bodies)
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(here.parent), str(here.parent.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "loadkit.raw", amqp_url, str(len(bodies)),
                             str(prefetch)], stdout=subprocess.PIPE, env=env)
    before = cpu_sample(proc.pid)
    try:
        out, _ = proc.communicate(timeout=RAW_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    after = cpu_sample(os.getpid())
    if proc.returncode != 0:
        raise RuntimeError(f"raw consumer exited {proc.returncode}")
    state = orjson.loads(out.splitlines()[-1])
    seconds = state["t1"] - state["t0"]
    n = len(bodies)
    return RawResult(messages=n, prefetch=prefetch, seconds=seconds, per_s=n / seconds,
                     cpu_ms_per_message=1000 * (state["cpu1"] - state["cpu0"]) / n,
                     broker_ms_per_message=1000 * (after.broker - before.broker) / n)


if __name__ == "__main__":
    main()
