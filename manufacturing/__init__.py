"""moeworks manufacturing."""
