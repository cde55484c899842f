"""Storage: every SQL statement of the server lives in this package."""
