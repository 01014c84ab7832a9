"""`gpt-serve`: OpenAI's completions API over the engine (the extra `gpt2np[serve]`).

    protocol.py     the wire format: request schemas, response bodies, OpenAI's error shape
    completions.py  serving /v1/completions: requests -> engine sequences -> responses and streams
    worker.py       the engine's thread: continuous batching, capacity, cancellation
    metrics.py      Prometheus metrics
    app.py          the HTTP endpoints and middleware (API key, body limit, draining)
    cli.py          the `gpt-serve` command and its draining shutdown

`import gpt2np` never imports this package: FastAPI, uvicorn and prometheus_client load only here.
"""
