"""alertd: consume video alerts from RabbitMQ, probe the clip, store and deliver the result."""

__version__ = "0.1.0"
