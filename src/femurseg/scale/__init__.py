"""Scale-out back-ends: Ray (one task per fold, actors for batch prediction) and torch.distributed DDP.

They call training and inference; training and inference never import them (the CLI passes a back-end in).
"""
