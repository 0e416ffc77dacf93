-- wrk -s bench/https.lua https://www.bench.test/: connect to the address in WRK_CONNECT_TO
-- instead of looking the URL's name up (the lab has no DNS, and a namespace shares the host's
-- /etc/hosts). wrk still sends the name as the TLS SNI and in the Host header.
function wrk.resolve(host, service)
   wrk.addrs = wrk.lookup(os.getenv("WRK_CONNECT_TO"), service)
end
