"""Pure models and rules of the platform; imports nothing of ours and nothing of Dagster."""
