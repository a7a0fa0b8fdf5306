"""The scoring service: velocity features, rules, model and decisions, exactly once.

`transactions.valid` -> per-account velocity in Redis -> features -> rules + model -> decision
and ranked reasons -> `risk.scores` (ScoredTransaction, keyed by account_id); the latest
assessment per account goes to Redis for the query service. A second loop consumes
`risk.labels` into the terminal-risk features and the live precision/recall metrics. Run it with
`python -m services.scoring`.
"""
