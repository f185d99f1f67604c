"""Deterministic offline solutions of agent tasks: no model, same answer every time."""
