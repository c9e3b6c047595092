"""The admin's window: the console (server-rendered pages), the REST API under /api/, /metrics and health.

One FastAPI application (``app.create_app``) served by Uvicorn, as a stage of
``nnrouter serve`` or alone (``nnrouter web``). Like every stage it only
reads and writes the store: a change made here (a rule file saved, a
delivery queued again, a flag resolved) is picked up by the stage that owns
it, and every change is written to the audit trail.
"""
