"""Benchmarks of asyncvae against other clients (run with ``python -m bench``)."""
