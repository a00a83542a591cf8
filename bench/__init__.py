"""Benchmarks and the throwaway-cluster harness the end-to-end tests share."""
