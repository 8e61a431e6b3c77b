"""Distributed sweeps on Ray: the corpus blocks of a sweep spread over many workers."""
