"""The edge tier: the middle blocks, per-session replicas, hierarchical aggregation."""
