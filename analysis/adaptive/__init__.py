"""Adaptive scaling studies: run a grid in rounds and spend cells only where a verdict is open.

Pure logic on points DataFrames (no Ray, no MLflow): `policy.AdaptivePolicy` decides the rounds,
`replay.replay` runs it on a finished study, `synthetic.generate_study` makes known-truth studies.
"""
