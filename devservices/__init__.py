"""Local stand-ins for production services the tests run for real (Neo4j from Maven Central)."""
