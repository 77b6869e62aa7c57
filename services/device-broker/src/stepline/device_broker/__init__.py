"""Stepline device_broker."""
