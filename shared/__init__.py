"""Common package of the three tiers: wire format, partitioning, adapters, aggregation, plug-ins, data, CLI."""
