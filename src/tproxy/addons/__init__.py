"""Addons: Python files that see, decide and change the sessions they claim (issue 12).

An addon is a file given to `tproxy run --addon FILE` (repeatable; `addon = [...]` in the
config file). Its module-level functions named after the hooks are its hooks, or the methods of
the objects in its module-level `addons = [obj, ...]` list; a hook is a plain function or an
`async def`. `tproxy.addons.api` is what an addon imports (the `Session` protocol, the verdicts,
`HOOKS`); `tproxy.addons.loader` loads and checks the files.

The order of calls, for one session (as issue 12 specifies it):

1. The policy decides (`tproxy.policy`). When a rule needs sniffed facts, or an addon said
   `sniff = True` at module level, the session first waits for the client's first bytes (at
   most the sniff timeout), so `session.sniffed` is known in the next step.
2. `session_start(session)` of every addon, in the order the files were given (within a file:
   its module-level hooks, then its `addons` objects in order), before the upstream connect.
   One may return a verdict (`allow()`, `reset()`, `redirect("host:port")`,
   `via("socks5://...")`) or None for no opinion: the first verdict that is not None wins over
   the policy's. One may call `session.claim()` for the session's bytes.
3. Only for a claimed session: `client_data(session, data)` and `server_data(session, data)`
   for each chunk, returning the bytes to send on (changed, of any length; empty to hold them
   back), and `client_eof(session)` / `server_eof(session)` when a side sends FIN, returning
   what to flush before the FIN goes on. A session no addon claims relays on the zero-copy path
   and runs no Python per chunk.
4. `session_end(session)` for every session whose `session_start` ran, with its byte counts
   and close `reason`.

An exception in a hook ends that session only (reset, close reason `addon_error`); a file that
does not load stops `tproxy run` at start, and a SIGHUP reload keeps the running addons.

Where it lives: loading (`tproxy.addons.loader`: each file a module of its own, its hooks
found and checked, start-up or a reload failing with one line naming the file and line); the
engine calling `session_start` and `session_end` (`tproxy.engine.addon_session`,
`tproxy.engine.session`); the byte hooks (`tproxy.engine.addon_chain`), run by the addon relay
on a claimed session's bytes (`tproxy.engine.addon_relay`) or, for a session a
`tls = "intercept"` rule decrypts, by the TLS relay on its plaintext
(`tproxy.engine.tls_relay`; `session.tls` says so). Not done: name resolution for addons'
`redirect` and `via` verdicts (they take IP addresses).
"""
