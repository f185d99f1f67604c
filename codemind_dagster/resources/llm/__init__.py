"""The model router, its providers, price table, response cache and ledger."""
