"""The HTML report and its figures (paper 001 Figs. 2-7, surface-distance maps, training curves)."""
