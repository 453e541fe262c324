"""Checkpoint conversions: consolidated export, resharding, SwissArmyTransformer (GLM-130B) import."""
