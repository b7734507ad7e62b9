"""moeworks twin."""
