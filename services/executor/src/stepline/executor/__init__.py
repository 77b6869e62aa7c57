"""Stepline executor."""
