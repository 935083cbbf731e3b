"""Training-side code that is not shipped with the weights: data splits, evaluation sets, responders, metrics.

Importing this package imports none of its modules (they pull in torch, nltk, sentence-transformers lazily).
"""
