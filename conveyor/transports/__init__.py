"""Brokers: move task messages to workers. One module per store."""
