"""Experiments: the paper-001 model grid, the CT study (paper 003) and the demo."""
