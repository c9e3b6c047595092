"""What nnrouter makes: the study's Structured Report and the hanging layouts and Hanging Protocol objects."""
