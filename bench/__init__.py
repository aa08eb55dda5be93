"""asv benchmarks for dynamem (see README.md). Discovery must never boot a guest."""
