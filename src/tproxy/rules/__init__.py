"""The nftables ruleset and policy routing that divert traffic to the proxy."""
