"""The live terminal view of `fraudstream run`: pure state plus a text renderer.

`LiveStats` is fed plain numbers (topic end offsets, group lags, scored records, alerts) by the
Kafka watcher in `shared.run`; `render` turns a snapshot into the screen. Keeping the two apart
lets tests check the arithmetic and the layout without a broker.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

__all__ = ["AlertLine", "LiveStats", "render"]

STAGES = ("raw", "valid", "dlq", "scores", "alerts", "labels")


@dataclass(frozen=True)
class AlertLine:
    created_at: float
    severity: str
    account_id: str
    score: float
    decision: str
    reasons: str


@dataclass
class LiveStats:
    """Everything the view shows. Rates come from end-offset deltas between two refreshes."""

    started_at: float = field(default_factory=time.monotonic)
    end_offsets: dict[str, int] = field(default_factory=dict)
    previous_offsets: dict[str, int] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    lags: dict[str, int] = field(default_factory=dict)
    decisions: Counter[str] = field(default_factory=Counter)
    severities: Counter[str] = field(default_factory=Counter)
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=20_000))
    recent_alerts: deque[AlertLine] = field(default_factory=lambda: deque(maxlen=8))
    scored: int = 0
    alerts: int = 0
    published: int = 0
    simulated_time: str = ""
    last_refresh: float = field(default_factory=time.monotonic)

    def update_offsets(self, offsets: dict[str, int], now: float) -> None:
        elapsed = max(now - self.last_refresh, 1e-6)
        for stage, offset in offsets.items():
            before = self.end_offsets.get(stage, offset)
            self.rates[stage] = max(offset - before, 0) / elapsed
        self.previous_offsets = dict(self.end_offsets)
        self.end_offsets = dict(offsets)
        self.last_refresh = now

    def record_score(self, decision: str, latency_ms: float | None) -> None:
        self.scored += 1
        self.decisions[decision] += 1
        if latency_ms is not None and latency_ms >= 0:
            self.latencies_ms.append(latency_ms)

    def record_alert(self, alert: AlertLine) -> None:
        self.alerts += 1
        self.severities[alert.severity] += 1
        self.recent_alerts.appendleft(alert)

    def latency_percentiles(self) -> tuple[float, float] | None:
        if not self.latencies_ms:
            return None
        values = np.fromiter(self.latencies_ms, dtype=np.float64)
        p50, p99 = np.percentile(values, [50, 99])
        return float(p50), float(p99)


def _bar(share: float, width: int = 24) -> str:
    filled = round(max(0.0, min(share, 1.0)) * width)
    return "#" * filled + "." * (width - filled)


def render(stats: LiveStats, *, now: float | None = None, width: int = 100) -> str:
    """The screen as text (no ANSI codes; the caller clears the terminal)."""
    now = time.monotonic() if now is None else now
    uptime = int(now - stats.started_at)
    lines = [
        f"fraudstream live  up {uptime // 60:02d}:{uptime % 60:02d}"
        f"   published {stats.published:,}   scored {stats.scored:,}   alerts {stats.alerts:,}"
        + (f"   sim time {stats.simulated_time}" if stats.simulated_time else ""),
        "",
        "stage                 tx/s      total      consumer lag",
    ]
    lag_of = {"raw": "ingest", "valid": "scoring", "scores": "alerting"}
    for stage in STAGES:
        if stage not in stats.end_offsets:
            continue
        group = lag_of.get(stage)
        lag = f"{stats.lags[group]:>8,} ({group})" if group and group in stats.lags else ""
        lines.append(
            f"{stage:<16}{stats.rates.get(stage, 0.0):>10,.0f}{stats.end_offsets[stage]:>11,}"
            f"      {lag}"
        )
    percentiles = stats.latency_percentiles()
    lines.append("")
    lines.append(
        "latency raw -> scored   "
        + (f"p50 {percentiles[0]:,.0f} ms   p99 {percentiles[1]:,.0f} ms" if percentiles else "-")
    )
    lines.append("")
    lines.append("decisions")
    total = sum(stats.decisions.values()) or 1
    for decision in ("APPROVE", "REVIEW", "DECLINE"):
        count = stats.decisions.get(decision, 0)
        lines.append(
            f"  {decision:<8} {_bar(count / total)} {count:>9,}  {100 * count / total:5.1f}%"
        )
    lines.append("")
    severity_text = "  ".join(f"{k} {v:,}" for k, v in sorted(stats.severities.items()))
    lines.append(f"latest alerts   {severity_text}")
    for alert in stats.recent_alerts:
        stamp = time.strftime("%H:%M:%S", time.localtime(alert.created_at))
        line = (
            f"  {stamp} {alert.severity:<8} {alert.account_id:<12} score {alert.score:.2f} "
            f"{alert.decision:<8} {alert.reasons}"
        )
        lines.append(line[:width])
    if not stats.recent_alerts:
        lines.append("  (none yet)")
    lines.append("")
    lines.append("Ctrl-C stops everything cleanly.")
    return "\n".join(lines)
