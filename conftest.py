"""Fixtures shared by every test in the repository (real PostgreSQL, NATS, ...)."""

pytest_plugins = ["stepline.common.testing"]
