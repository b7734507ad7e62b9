"""The twin's HTTP API: the FastAPI app factory, one router per resource, request/response models."""
