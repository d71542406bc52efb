"""egress-collector: stores egressd's denial events in ``system.access.outbound_network``.

    egressd daemon --POST /v1/events--> app (validate: core.events) --> store (DuckDB, one tx/batch)
    egressctl logs  --GET /v1/events---> app --> store.query_events (newest first)
    egressctl logs sql --POST /v1/sql--> app --> sqlguard.translate (Spark -> DuckDB, read-only)
                                                 --> store.run_sql (read-only transaction)

Modules: ``store`` (DuckDB), ``sqlguard`` (query vetting and translation), ``app`` (HTTP API),
``cli`` (the ``egress-collector`` command).
"""
