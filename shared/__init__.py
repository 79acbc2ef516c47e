"""fedtiny's algorithms: data, models, pruning, batch norm, codec and accounting.

Nothing in this package imports Flower, so every piece is usable (and tested) alone.
"""
