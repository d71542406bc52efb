"""The daemon's local HTTP API (SPEC section 5): a unix socket, and optionally TCP with a token."""
