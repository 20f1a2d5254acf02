"""An HTTP server for synthesis that batches concurrent requests (docs/serving.md).

    python -m valle_jax.serve --checkpoint PATH [--host --port --max-batch --max-wait-ms ...]

`engine` gathers requests into one decoder call whose rows carry each request's own sampling settings,
`voices` encodes and caches voices by content hash, `app` is the FastAPI application (endpoints, limits,
metrics), `__main__` the command line (uvicorn).
"""
