"""Session events and how they are written: text for humans, JSON for machines."""
