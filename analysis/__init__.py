"""medscale analysis: scaling curves, plots and reports from sweep results."""
