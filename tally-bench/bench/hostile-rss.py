#!/usr/bin/env python3
"""RSS of a server under hostile connections, and after they close (issue 11).

    tally-bench/bench/hostile-rss.py PORT -- COMMAND...

Starts COMMAND (it must listen on 127.0.0.1:PORT), then measures its resident set size:
idle; with 1,000 connections each holding ~30 KiB of an unterminated request head; after
they close; with 60 connections each sending 4 MiB - 1 of a body it never completes; after
those close. "After" is read 2 s after the last socket closed, and again after 2,000 small
requests (allocators return memory on later activity, not on an idle process).
"""
import socket, subprocess, sys, time

def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")

def some_requests(port, n=2000):
    """n small requests on one kept-alive connection: allocator activity, as under any load."""
    s = socket.create_connection(("127.0.0.1", port))
    req = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    for _ in range(n):
        s.sendall(req)
        s.recv(4096)
    s.close()

def close_and_measure(pid, port, conns):
    for s in conns:
        s.close()
    time.sleep(2)
    print(f"  after they closed           {rss_mb(pid):7.1f} MB")
    some_requests(port)
    time.sleep(1)
    print(f"  and 2,000 requests later    {rss_mb(pid):7.1f} MB")

def main():
    port = int(sys.argv[1])
    command = sys.argv[sys.argv.index("--") + 1:]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(0.5)
        print(f"idle                          {rss_mb(server.pid):7.1f} MB")
        conns = []
        for i in range(1000):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * (30 * 1024))
            conns.append(s)
        time.sleep(1)
        print(f"1000 x 30 KiB head, open      {rss_mb(server.pid):7.1f} MB")
        close_and_measure(server.pid, port, conns)
        conns = []
        body = b'{"key":"' + b"k" * (4 * 1024 * 1024 - 1 - 20)
        head = (b"POST /increments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % (4 * 1024 * 1024))
        refused = 0
        for i in range(60):
            s = socket.create_connection(("127.0.0.1", port))
            try:
                s.sendall(head + body[: 4 * 1024 * 1024 - 1])
            except OSError:  # answered 503 before the body, and closed
                refused += 1
            conns.append(s)
        time.sleep(1)
        print(f"60 x (4 MiB - 1) body, open   {rss_mb(server.pid):7.1f} MB  ({refused} refused)")
        close_and_measure(server.pid, port, conns)
    finally:
        server.terminate()
        server.wait()

main()
