"""Protocols only: KServe v2 over HTTP and gRPC, the OpenAI API, management.

Each transport decodes bytes into `slimserve.types`, calls one `Engine` method, encodes the
answer and maps `SlimserveError` codes to its status codes from one table. No serving logic
(batching, caching, variant choice) lives here.
"""
