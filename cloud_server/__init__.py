"""The cloud tier: the last blocks and the head, rounds, aggregation, the store."""
