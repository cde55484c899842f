"""Python SDK for Chronoplane."""
