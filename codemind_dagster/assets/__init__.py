"""Assets by group: intake, delivery, platform, finops."""
