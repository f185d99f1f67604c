"""Agents package."""
