"""Routing: the rules admins write, the router that decides and writes outbox rows, and the forwarder that delivers them."""
