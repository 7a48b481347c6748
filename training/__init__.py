"""tunesmith.training."""
