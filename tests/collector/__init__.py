"""The collector: decoding, the live capture, retention, the celery oracle, Redis Cluster."""
