"""Running tproxy as a service: systemd's notify protocol (`notify`)."""
