"""A demo Celery app, its traffic generator and the `make run` launcher."""
