"""Adapters: the outside world (AMQP, PostgreSQL, HTTP, ffprobe) behind the ports."""
