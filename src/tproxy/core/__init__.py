"""Pure data and decisions: endpoints, the session record, the close lifecycle. No I/O."""
