"""Fixtures shared by every test in the repository (real PostgreSQL, NATS, adb, ...)."""

pytest_plugins = ["stepline.common.testing", "stepline.phone.testing"]
