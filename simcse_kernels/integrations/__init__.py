"""Integrations with other libraries (each optional; importing this package imports none of them).

- :mod:`simcse_kernels.integrations.sentence_transformers`: drop-in replacements for
  sentence-transformers' ``MultipleNegativesRankingLoss`` and ``CachedMultipleNegativesRankingLoss``
  (needs ``pip install 'simcse-kernels[st]'``).
"""
