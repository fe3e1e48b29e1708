"""Small shared helpers: logging, asset discovery."""
