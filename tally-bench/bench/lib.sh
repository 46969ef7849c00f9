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
