"""fedfew federation package."""
