"""The HTTP service: create_app(settings) in app.py; the continuous-batching engine in engine/."""
