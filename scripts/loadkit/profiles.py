"""The load profiles: which clips, how slow the clip server is, how the webhook sink answers."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Profile:
    """What alertd sees during a run. Latencies are seconds, bandwidth bytes/s per connection."""

    name: str
    summary: str
    clips: tuple[str, ...]  # clip sizes (loadkit.clips.SIZES), served round-robin
    clip_latency_s: float = 0.0  # before the response headers, every request
    clip_jitter_s: float = 0.0  # plus uniform(0, jitter)
    bandwidth_bps: float = 0.0  # per connection; 0 = unlimited
    sink_latency_s: float = 0.0
    sink_jitter_s: float = 0.0
    sink_failure_rate: float = 0.0  # share of webhook attempts answered 500 (alertd retries)

    def describe(self) -> str:
        bandwidth = (f"{self.bandwidth_bps / 1e6:g} MB/s per connection" if self.bandwidth_bps
                     else "unlimited")
        return (f"clips {', '.join(self.clips)}; clip server latency "
                f"{_ms(self.clip_latency_s)} + uniform(0, {_ms(self.clip_jitter_s)}), "
                f"bandwidth {bandwidth}; webhook sink latency {_ms(self.sink_latency_s)} + "
                f"uniform(0, {_ms(self.sink_jitter_s)}), "
                f"{self.sink_failure_rate:.1%} of attempts answered 500")

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "summary": self.summary, "clips": list(self.clips),
                "clip_latency_s": self.clip_latency_s, "clip_jitter_s": self.clip_jitter_s,
                "bandwidth_bps": self.bandwidth_bps, "sink_latency_s": self.sink_latency_s,
                "sink_jitter_s": self.sink_jitter_s,
                "sink_failure_rate": self.sink_failure_rate}


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:g} ms"


PROFILES = {
    "io-bound": Profile(
        "io-bound",
        "a slow clip server (200-500 ms before the first byte, 1 MB/s per connection): "
        "alerts mostly wait on the network, as in production",
        clips=("tiny", "small"), clip_latency_s=0.2, clip_jitter_s=0.3, bandwidth_bps=1e6,
        sink_latency_s=0.01, sink_jitter_s=0.02, sink_failure_rate=0.005),
    "cpu-bound": Profile(
        "cpu-bound",
        "~2 MB clips from a fast server, really probed: download, hashing and probing "
        "cost CPU",
        clips=("large",)),
    "overhead": Profile(
        "overhead",
        "a tiny clip served at once, webhooks answered at once: the framework's own cost "
        "per alert (AMQP, JSON, database, probe round trip, webhook)",
        clips=("tiny",)),
}


def with_overrides(profile: Profile, **overrides: Any) -> Profile:
    """The profile with every override that is not None applied."""
    given = {key: value for key, value in overrides.items() if value is not None}
    if "clips" in given:
        given["clips"] = tuple(given["clips"])
    return replace(profile, **given) if given else profile
