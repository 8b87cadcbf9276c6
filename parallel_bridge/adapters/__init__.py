"""Adapters from a ParallelContext to each library's parallel state; each imports its library lazily."""
