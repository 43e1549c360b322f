"""Checks of the regularity assumptions and claims behind PGPO's order-1 guarantee."""
