"""Training: losses, the fit loop (checkpoints, early stopping, resume) and k-fold cross-validation.

Imports evaluation, inference and the layers below; the distributed back-ends are passed in by the caller.
"""
