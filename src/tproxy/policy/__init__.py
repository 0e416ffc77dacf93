"""The policy: a validated model of the policy file (`model`) and the pure function that gives a
session its verdict (`decide`)."""
