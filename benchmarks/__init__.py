"""strata's benchmarks: DESIGN section 7's table, measured side by side in one run (``python -m benchmarks``)."""
