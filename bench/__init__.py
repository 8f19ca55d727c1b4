"""The benchmarks (not in CI): run each as `python -m bench.<script>` from the repository root."""
