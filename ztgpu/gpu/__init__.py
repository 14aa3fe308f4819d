"""GPU inventory backends."""
