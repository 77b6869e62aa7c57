"""Stepline ledger."""
