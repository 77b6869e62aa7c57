"""Stepline approvals."""
