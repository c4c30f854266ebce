"""medscale orchestration: the only place that talks to Ray and MLflow."""

__version__ = "0.1.0"
