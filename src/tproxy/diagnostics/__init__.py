"""`tproxy doctor`: what a working setup needs, checked in the current network namespace."""
