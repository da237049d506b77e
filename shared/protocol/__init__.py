"""What crosses the wire: message and record names, error codes, the app bundle, keys."""
