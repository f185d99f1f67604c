"""Sensors package."""
