import os, sys, time
path = sys.argv[1]; mode = sys.argv[2]; n = int(sys.argv[3])
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
zeros = b"\0" * (1 << 20)
for i in range(16): os.pwrite(fd, zeros, i << 20)
os.fsync(fd)
buf = b"x" * 8192
off = 0
t0 = time.perf_counter()
lat = []
for i in range(n):
    if mode == "pwritev2":
        a = time.perf_counter(); os.pwritev(fd, [buf], off, os.RWF_DSYNC); lat.append(time.perf_counter() - a)
    else:
        os.pwrite(fd, buf, off)
        a = time.perf_counter(); os.fdatasync(fd); lat.append(time.perf_counter() - a)
    off += 8192
    if mode == "spaced": time.sleep(0.002)
lat.sort()
print(f"{mode}: {n} syncs, mean {sum(lat)/n*1e6:.0f} us, p50 {lat[n//2]*1e6:.0f} us, p90 {lat[n*9//10]*1e6:.0f} us")
