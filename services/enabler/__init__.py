"""The enabler: enable_events broadcasts, inspect data and queue lengths, kept in Redis."""
