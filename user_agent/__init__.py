"""The user tier: local data, the first blocks of the model, the local training loop."""
