"""Service functions: primitives in, one transaction (the caller's session), values out."""
