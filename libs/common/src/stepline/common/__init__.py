"""Stepline common."""
