"""What every stage shares: configuration (read once), the store that is the queue between stages, the spool, logging, codes and YAML reading."""
