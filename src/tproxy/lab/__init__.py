"""The namespace lab: client, router and server namespaces for the demo and the tests."""
