"""Pollen's HTTP API: a stateless aiohttp app over the Redis state the collector writes.

Flower-compatible task and worker endpoints, a WebSocket event relay, Prometheus metrics,
health probes and an OpenAPI description. Every replica answers the same from Redis.
"""
