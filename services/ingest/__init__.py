"""The ingest service: validate, deduplicate and forward transactions exactly once.

`transactions.raw` -> decode (protobuf or JSON) -> validate and normalize -> drop producer
retries -> `transactions.valid` (protobuf, keyed by account_id); rejects go to
`transactions.dlq` with headers naming the error. Run it with `python -m services.ingest`.
"""
