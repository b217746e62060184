"""Adapters for data-processing frameworks (optional extras; nothing is imported here).

- :mod:`asyncvae.integrations.ray`: ``VAEEncode`` / ``AsyncVAEEncode`` for
  ``ray.data.Dataset.map_batches``.
"""
