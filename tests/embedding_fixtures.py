"""Placeholder until the embedding API fixtures land."""
