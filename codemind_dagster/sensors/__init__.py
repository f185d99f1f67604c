"""Sensors: intents and promotion."""
