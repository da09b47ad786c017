"""Inference: the network on a volume (tiling, CPU arithmetic, ONNX), predict, thresholds, post-processing.

The run folder (:mod:`femurseg.inference.run`) is what training writes and inference reads.
Imports only :mod:`femurseg.core`, :mod:`femurseg.data` and :mod:`femurseg.models`.
"""
