"""Celery app, thin task definitions, queue routing, the embedded launcher and the `sidetune` CLI."""
