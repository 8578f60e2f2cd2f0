"""`lmm serve`: an OpenAI-compatible HTTP server (FastAPI app in `app.py`, request batching in `batcher.py`,
wire format in `protocol.py`). Needs the `serve` extra: pip install 'lmm[serve]'."""
