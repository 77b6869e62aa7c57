"""pytest fixtures for tests against the real adb server and simulated phones."""
