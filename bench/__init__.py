"""The peer benchmark harness (not installed; run from a checkout). See docs/benchmarks.md."""
