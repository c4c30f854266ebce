"""medscale tasks: encoders, datasets and protocols (no Ray, no MLflow in here)."""
