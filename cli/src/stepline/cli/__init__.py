"""Stepline cli."""
