"""tunesmith.recipes."""
