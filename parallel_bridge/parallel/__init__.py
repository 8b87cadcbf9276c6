"""The parallel layout: rank arithmetic, ParallelContext (a value), its process groups, where a job starts."""
