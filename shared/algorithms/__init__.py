"""Algorithm plug-ins: the interface, the registry, FedAvg."""
