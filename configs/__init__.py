"""tunesmith.configs."""
