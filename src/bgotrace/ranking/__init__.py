"""Ranking stage: scores -> ranked units, documents and sources; the result object."""
