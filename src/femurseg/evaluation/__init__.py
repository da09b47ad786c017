"""Evaluation: metrics, per-case evaluation of masks and runs, statistics, model comparison and the report.

Imports inference (thresholds, post-processing, run folders) and the layers below it; never training.
"""
