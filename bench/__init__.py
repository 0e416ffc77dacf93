"""The benchmark: tproxy against plain routing and HAProxy, side by side, in one run."""
