"""OpenAI-compatible HTTP server (FastAPI + uvicorn); needs the `server` extra. See docs/server.md."""
