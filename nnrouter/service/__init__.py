"""The processes: how a stage starts, loops and stops, the supervisor that runs them, the cleaner and the health figures."""
