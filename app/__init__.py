"""fedfew app package."""
