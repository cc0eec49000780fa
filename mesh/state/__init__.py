"""Typed mesh state: workloads, services and policies, with the indexes the data path needs."""
