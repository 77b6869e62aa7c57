"""Stepline simulated cloud phone."""
