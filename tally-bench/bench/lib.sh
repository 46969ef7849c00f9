# Shared by the bench scripts (sourced, not run).

# wait_healthy ADDR [TRIES]: polls http://ADDR/healthz every 0.1 s, TRIES times (default 200),
# until it answers; fails if it never does.
wait_healthy() {
    for _ in $(seq "${2:-200}"); do
        curl -fs "http://$1/healthz" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    return 1
}

# free_port: a port for a server under test, below Linux's ephemeral range (32768 and up, where
# wrk's own client sockets live) and not in use by any socket now.
free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 12000))
        ss -Htan "( sport = :$port or dport = :$port )" 2>/dev/null | grep -q . || break
    done
    echo "$port"
}
