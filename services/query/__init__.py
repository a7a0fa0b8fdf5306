"""The query service: the gRPC RiskService for synchronous risk checks and lookups.

CheckTransaction scores a transaction read-only with the scoring service's own features, rules
and model (optionally recording it to `transactions.raw`), answering by a fail-open or
fail-closed policy within the caller's deadline when Redis is slow or down; GetAccountRisk,
ListAlerts and WatchAlerts read the pipeline's Redis state. Standard gRPC health and reflection
are served beside it. Run it with `python -m services.query`.
"""
