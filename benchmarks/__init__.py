"""Throughput and latency of the backends and of the server, measured."""
