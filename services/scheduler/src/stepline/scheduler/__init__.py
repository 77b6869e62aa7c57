"""Stepline scheduler."""
