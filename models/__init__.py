"""fedfew models package."""
