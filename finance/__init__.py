"""moeworks finance."""
