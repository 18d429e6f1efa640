"""Analysis helpers (cost accounting of the loss backends)."""
