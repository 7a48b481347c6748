"""tunesmith.models."""
