"""Linux facts: transparent sockets, marks, the descriptor limit, the self-connection guard."""
