"""Resources: platform database, graph store, artifacts, sandbox, runtime and the model router."""
