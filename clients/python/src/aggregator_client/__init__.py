"""Client library, logging handler and `aggregator` command for the log aggregator's HTTP API.

Its own distribution, `log-aggregator-client` (clients/python/ in the
repository), with click, orjson, tqdm and urllib3 as its only dependencies.
`aggregator_client.client.Client` publishes with batching, Idempotency-Keys and
retries that honour Retry-After, and reads events, follows them and reads
counters; `aggregator_client.logging.AggregatorHandler` ships Python log
records through it; `aggregator_client.cli` builds the `aggregator` command on
it; `aggregator_client.event_ids` is the documented event_id recipe.
"""
