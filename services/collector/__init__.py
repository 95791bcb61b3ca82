"""The collector: Celery events from the broker, merged into Redis by celery's own rules."""
