"""Assets package."""
