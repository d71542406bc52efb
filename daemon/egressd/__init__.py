"""egressd: an egress firewall for Linux nodes that run other people's workloads.

Data flow::

    workload ──DNS :53──▶ nft dns_redirect ──▶ shim ──classify──▶ engine (policy verdict)
                                                 │                    │ allowed: forward upstream
                                                 │◀── answer ─────────┘
                                                 ├──program IPs──▶ nft timeout sets (before release)
                                                 └──answer──▶ workload
    workload ──new flow──▶ nft forward ──vmap by source──▶ workspace chain
                                         allowed set? accept : reject/drop (or accept in dry run)

``core/`` is pure (policy model, name matching, verdicts, plan, ruleset rendering, DNS messages);
``nft``, ``shim``, ``daemon`` and the HTTP services are the adapters around it.
"""

__version__ = "0.1.0"
