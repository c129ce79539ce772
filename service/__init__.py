"""metal-marlin HTTP service: OpenAI-compatible completions and a quantization jobs API.

FastAPI gateway in front of one worker process (:mod:`worker`) that owns MLX. Start it with
:func:`service.main.serve` (``metal-marlin serve``) or ``python -m service``; build the app
with :func:`service.app.create_app`. This package never imports MLX.
"""
