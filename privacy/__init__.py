"""fedfew privacy package."""
