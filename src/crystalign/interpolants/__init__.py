"""interpolants."""
