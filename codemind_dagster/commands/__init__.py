"""CLI commands of the platform group: state, backup, dr, backfill."""
