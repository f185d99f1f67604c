"""The agents: typed tasks that reach models only through the model router."""
