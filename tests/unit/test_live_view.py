"""The live view's arithmetic and layout, without a broker."""

from __future__ import annotations

from shared.live_view import AlertLine, LiveStats, render


def test_rates_come_from_offset_deltas() -> None:
    stats = LiveStats(started_at=0.0, last_refresh=0.0)
    stats.update_offsets({"raw": 100, "scores": 0}, now=1.0)
    stats.update_offsets({"raw": 600, "scores": 400}, now=3.0)
    assert stats.rates == {"raw": 250.0, "scores": 200.0}


def test_latency_percentiles_ignore_negative_clock_skew() -> None:
    stats = LiveStats()
    for latency in range(1, 101):
        stats.record_score("APPROVE", float(latency))
    stats.record_score("DECLINE", -5.0)  # clock skew between hosts: not a latency
    p50, p99 = stats.latency_percentiles() or (0.0, 0.0)
    assert 50 <= p50 <= 51
    assert 98 <= p99 <= 100
    assert stats.decisions == {"APPROVE": 100, "DECLINE": 1}


def test_render_shows_stages_lags_decisions_and_alerts() -> None:
    stats = LiveStats(started_at=0.0, last_refresh=0.0)
    stats.update_offsets({"raw": 10, "valid": 9, "dlq": 1, "scores": 9, "alerts": 2}, now=1.0)
    stats.lags = {"ingest": 3, "scoring": 0}
    stats.record_score("REVIEW", 12.0)
    stats.record_alert(AlertLine(0.0, "HIGH", "acct-00042", 0.97, "DECLINE", "CARD_TESTING"))
    screen = render(stats, now=65.0)
    assert "up 01:05" in screen
    assert "dlq" in screen
    assert "3 (ingest)" in screen
    assert "REVIEW" in screen and "100.0%" in screen
    assert "acct-00042" in screen and "CARD_TESTING" in screen
    assert "p50 12 ms" in screen
