"""The HTTP edge: thin blueprints over the service functions."""
