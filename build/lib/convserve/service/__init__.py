"""The FastAPI inference service (never imports torch)."""
