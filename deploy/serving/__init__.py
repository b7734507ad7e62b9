"""Serving: a FastAPI app run by gunicorn (uvicorn workers) in front of core's dynamic batcher."""
