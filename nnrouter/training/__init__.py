"""Training and measuring the models. Only the [train] extra and the CLI's training commands import this wing; the service never does."""
