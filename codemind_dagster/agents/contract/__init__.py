"""Contract tests derived from an intent alone (spec section 2)."""
