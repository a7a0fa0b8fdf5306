"""Prometheus metrics: each service exposes /metrics on its own port (METRICS_PORT)."""

from __future__ import annotations

from prometheus_client import start_http_server

from shared.logging import get_logger

__all__ = ["DEFAULT_METRICS_PORTS", "serve_metrics"]

log = get_logger(__name__)

DEFAULT_METRICS_PORTS = {"ingest": 9101, "scoring": 9102, "alerting": 9103, "query": 9104}


def serve_metrics(service: str, configured: int | None) -> int | None:
    """Start the metrics endpoint; return its port, or None when disabled (port 0)."""
    port = DEFAULT_METRICS_PORTS.get(service, 0) if configured is None else configured
    if port == 0:
        return None
    try:
        start_http_server(port, addr="127.0.0.1" if service == "test" else "0.0.0.0")
    except OSError as e:  # a busy port must not stop fraud scoring; say so loudly
        log.error("metrics_port_unavailable", port=port, error=str(e))
        return None
    log.info("metrics_serving", port=port)
    return port
