"""TLS interception: the CA (`ca`), which names a forged certificate carries (`names`), and the
forging of leaf certificates with their cache (`forge`).

Everything here but `ca`'s file reading and writing is pure: names and certificates in, names and
certificates out. Names come from the client's SNI and from the upstream's certificate, both of
which an attacker may control: they are validated, bounded, and a bad one is an answer the
engine can log (`NamesRejected`), never an exception.
"""
