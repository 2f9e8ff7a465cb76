"""Sinks and sources for bench/bench.py: each runs as its own process, stdlib only.

    peers.py sink   --mode stream|latency --expect N --size S --timeout SEC [--no-crc] [--sizes ID:S,...]
                    [--tls-cert PEM]
    peers.py bulk   --addrs H:P,... --size S [--ident I] [--tls-ca PEM]
    peers.py conns  --addrs H:P,... --count N --concurrency C --size S
    peers.py latency --addrs H:P,... --count M --rate HZ --warmup SEC
    peers.py hold   --addrs H:P,... --count N --messages K --size S --duration SEC

Every process talks to the bench by lines on stdout: a sink first prints "port P", then
"accepted N" once N connections arrived, then "result {json}" when N streams have ended (or at
its timeout). Sources print "result {json}"; hold prints "connected", "sent", then waits for a
line "close" on stdin before closing its connections.

A stream sink's streams are all --size bytes but those named in --sizes (stream number:size), whose
end the sink also reports as it happens by a line "eof ID T" (T in ns): so one sink checks streams of
differing sizes and times some of them (bench.py's unprivileged figure). bulk --ident I sends stream
number I (default 0); hold's streams are numbered 0 to --count - 1.

TLS (bench.py's tls figure): sink --tls-cert PEM (certificate chain and key) makes the sink a TLS
server: each accepted connection's handshake is done there and then (blocking, 10 s at most; a
connection that fails it is closed and listed in "bad"), and the checks below run on the plaintext.
bulk --tls-ca PEM speaks TLS to every address, verifying its certificate against that CA and for
127.0.0.1, and ends each stream with a close_notify (tls_close).

Stream content (mode stream): stream number i of S bytes is 8 bytes little-endian i, then the
pattern PAT from offset 8 on, PAT repeated with a prime period so no chunking lines up with it.
Sinks compare every received byte with the expected byte (memcmp through bytearray.startswith),
count the bytes and compute zlib.crc32 of the stream, checked against the crc of the expected
content. Times are CLOCK_MONOTONIC in ns, which all processes of the machine share.
"""
import argparse
import json
import random
import select
import socket
import ssl
import struct
import sys
import threading
import time
import zlib

PAT_LEN = 1_048_583  # prime, > WINDOW
WINDOW = 1 << 20  # largest recv/send slice
PAT = random.Random(20261125).randbytes(PAT_LEN)
DPAT = memoryview((PAT * 2)[:PAT_LEN + WINDOW])  # any window of <= WINDOW bytes at offset < PAT_LEN is contiguous
HEADER = struct.Struct("<Q")
REC = struct.Struct("<QQ")  # latency record: sequence, send time (ns)
REC_SIZE = 64
REC_PAD = PAT[:REC_SIZE - REC.size]
now_ns = time.monotonic_ns  # CLOCK_MONOTONIC


def cpu_s():
    return time.process_time()


def out(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def pattern_at(pos, length):
    """Expected bytes [pos, pos+length) of any stream, pos >= 8, length <= WINDOW."""
    off = pos % PAT_LEN
    return DPAT[off:off + length]


def stream_bytes(ident, size):
    """Whole content of stream ident (used for small streams)."""
    head = HEADER.pack(ident)[:size]
    body = bytearray()
    pos = len(head)
    while pos < size:
        n = min(WINDOW, size - pos)
        body += pattern_at(pos, n)
        pos += n
    return head + bytes(body)


def expected_crc(ident, size):
    crc = zlib.crc32(HEADER.pack(ident)[:size])
    pos = 8
    while pos < size:
        n = min(WINDOW, size - pos)
        crc = zlib.crc32(pattern_at(pos, n), crc)
        pos += n
    return crc


def parse_addrs(text):
    addrs = []
    for item in text.split(","):
        host, port = item.rsplit(":", 1)
        addrs.append((host, int(port)))
    return addrs


def connect(addr, nodelay=False):
    sock = socket.create_connection(addr)
    if nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def tls_close(sock):
    """Send close_notify and close, not waiting for the peer's (as most clients do). What the peer
    sent (TLS 1.3 session tickets) is read first: closing with unread bytes would reset the
    connection and discard what the kernel has not sent yet."""
    sock.setblocking(False)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            sock.unwrap()  # sends close_notify, then reads what is there up to the peer's
        except ssl.SSLWantWriteError:
            select.select([], [sock], [], 1)
            continue
        except (OSError, ValueError):  # SSLWantReadError: ours is sent, nothing more to read now
            pass
        break
    sock.close()


# -- sink ---------------------------------------------------------------------------------------

class StreamState:
    __slots__ = ("sock", "pos", "head", "crc", "bad_at", "seq", "tail", "lat")

    def __init__(self, sock):
        self.sock = sock
        self.pos = 0
        self.head = b""
        self.crc = 0
        self.bad_at = -1
        self.seq = 0
        self.tail = b""
        self.lat = []


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[k]


def run_sink(args):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    listener.setblocking(False)
    out("port %d" % listener.getsockname()[1])
    epoll = select.epoll()
    epoll.register(listener.fileno(), select.EPOLLIN)
    buf = bytearray(WINDOW)
    view = memoryview(buf)
    conns = {}
    latency = args.mode == "latency"
    use_crc = not args.no_crc
    tls = None
    if args.tls_cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(args.tls_cert)
        tls.num_tickets = 0  # the relays never read from their destination
    size = args.size
    sizes = {int(i): int(n) for i, n in (item.split(":") for item in args.sizes.split(",") if item)}
    accepted = done = good = total = 0
    ids = {}
    first_bytes = {}  # stream ident -> when its head (the ident) had come whole
    bad = []
    lats = []
    t_first_accept = t_last_eof = t_first_eof = None
    deadline = time.monotonic() + args.timeout
    timed_out = False
    cpu_at_eof = cpu_at_accept = None

    def finish(st):
        nonlocal done, good, t_last_eof, t_first_eof, cpu_at_eof
        t = now_ns()
        cpu_at_eof = cpu_s()  # before the expected crc is computed
        t_last_eof = t
        t_first_eof = t_first_eof or t
        done += 1
        epoll.unregister(st.sock.fileno())
        del conns[st.sock.fileno()]
        st.sock.close()
        if latency:
            ok = st.pos == size and st.bad_at < 0 and not st.tail
            lats.extend(st.lat)
            ident = 0
        else:
            ident = HEADER.unpack(st.head)[0] if len(st.head) == 8 else -1
            want = sizes.get(ident, size)
            ok = st.pos == want and st.bad_at < 0
            if ok and use_crc:
                ok = st.crc == expected_crc(ident, want)
                if not ok:
                    st.bad_at = -2
            if ident in sizes:
                out("eof %d %d" % (ident, t))
        ids[ident] = ids.get(ident, 0) + 1
        if ok:
            good += 1
        elif len(bad) < 5:
            bad.append({"id": ident, "bytes": st.pos, "first_bad_offset": st.bad_at})

    def consume(st, n):
        nonlocal total
        total += n
        if latency:
            t = now_ns()
            data = st.tail + bytes(view[:n])
            whole = len(data) - len(data) % REC_SIZE
            for k in range(0, whole, REC_SIZE):
                seq, sent = REC.unpack_from(data, k)
                if seq != st.seq or data[k + REC.size:k + REC_SIZE] != REC_PAD:
                    if st.bad_at < 0:
                        st.bad_at = st.pos + k
                st.seq += 1
                st.lat.append(t - sent)
            st.tail = data[whole:]
            st.pos += n
            return
        start = 0
        if st.pos < 8:
            start = min(8 - st.pos, n)
            st.head += bytes(view[:start])
            st.pos += start
            if st.pos == 8:
                first_bytes[HEADER.unpack(st.head)[0]] = now_ns()
        if use_crc:
            st.crc = zlib.crc32(view[:n], st.crc)
        m = n - start
        if m:
            if st.bad_at < 0 and not buf.startswith(pattern_at(st.pos, m), start, n):
                exp = pattern_at(st.pos, m)
                st.bad_at = st.pos + next(i for i in range(m) if buf[start + i] != exp[i])
            st.pos += m

    while done < args.expect:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        for fd, _ in epoll.poll(min(remaining, 1.0)):
            if fd == listener.fileno():
                while True:
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        break
                    if tls:
                        try:
                            sock.settimeout(10)
                            sock = tls.wrap_socket(sock, server_side=True)
                        except OSError as exc:  # no stream (the relay may connect again); said if it ends bad
                            sock.close()
                            if len(bad) < 5:
                                bad.append({"error": "TLS handshake: %s" % exc})
                            continue
                    sock.setblocking(False)
                    conns[sock.fileno()] = StreamState(sock)
                    epoll.register(sock.fileno(), select.EPOLLIN)
                    accepted += 1
                    if t_first_accept is None:
                        t_first_accept, cpu_at_accept = now_ns(), cpu_s()
                    if accepted == args.expect:
                        out("accepted %d" % accepted)
                continue
            st = conns.get(fd)
            if st is None:
                continue
            while True:
                try:
                    n = st.sock.recv_into(buf)
                except (BlockingIOError, ssl.SSLWantReadError):
                    break
                except OSError as exc:
                    st.bad_at = st.bad_at if st.bad_at >= 0 else -3
                    if len(bad) < 5:
                        bad.append({"error": str(exc)})
                    n = 0
                if not n:
                    finish(st)
                    break
                consume(st, n)
                if n < WINDOW and not tls:  # TLS reads a record at a time: read on to SSLWantReadError
                    break
    result = {"complete": done, "good": good, "bytes": total, "accepted": accepted,
              "t_first_accept": t_first_accept, "t_first_eof": t_first_eof, "t_last_eof": t_last_eof,
              "timeout": timed_out, "bad": bad, "open": len(conns),
              "busy": ((cpu_at_eof - cpu_at_accept) / ((t_last_eof - t_first_accept) / 1e9)
                       if cpu_at_eof is not None and t_last_eof > t_first_accept else None)}
    if not latency:
        result["distinct_ids"] = len(ids)
        if args.first_bytes:
            result["first_bytes"] = first_bytes
        result["missing_ids"] = sum(1 for i in range(args.expect) if i not in ids)
        result["dup_ids"] = sum(1 for c in ids.values() if c > 1)
    else:
        lats.sort()
        result["samples"] = len(lats)
        result["p50_us"] = percentile(lats, 0.50) / 1e3 if lats else None
        result["p99_us"] = percentile(lats, 0.99) / 1e3 if lats else None
        result["max_us"] = lats[-1] / 1e3 if lats else None
    out("result " + json.dumps(result))


# -- sources ------------------------------------------------------------------------------------

def run_bulk(args):
    """One stream of --size bytes, written to every address in turn (D > 1: the source fans out)."""
    addrs = parse_addrs(args.addrs)
    first = stream_bytes(args.ident, min(args.size, WINDOW))
    t0, cpu0 = now_ns(), cpu_s()
    socks = [connect(a) for a in addrs]
    if args.tls_ca:
        tls = ssl.create_default_context(cafile=args.tls_ca)
        socks = [tls.wrap_socket(s, server_hostname="127.0.0.1") for s in socks]
    size = args.size
    for s in socks:
        s.sendall(first)
    pos = len(first)
    while pos < size:
        n = min(WINDOW, size - pos)
        chunk = pattern_at(pos, n)
        for s in socks:
            s.sendall(chunk)
        pos += n
    t_sent = now_ns()
    for s in socks:
        if args.tls_ca:
            tls_close(s)
        else:
            s.close()
    out("result " + json.dumps({"t0": t0, "t_sent": t_sent,
                                "busy": (cpu_s() - cpu0) / max(1e-9, (t_sent - t0) / 1e9)}))


def run_conns(args):
    """--count connections (one per destination address each), --concurrency at a time, each sends
    --size bytes and closes."""
    addrs = parse_addrs(args.addrs)
    lock = threading.Lock()
    counter = iter(range(args.count))
    errors = []
    connecting = {}  # ident -> when its connect began (the sinks say when its first bytes came)

    def worker():
        while True:
            with lock:
                ident = next(counter, None)
            if ident is None:
                return
            data = stream_bytes(ident, args.size)
            connecting[ident] = now_ns()
            try:
                socks = [connect(a) for a in addrs]
                for s in socks:
                    s.sendall(data)
                for s in socks:
                    s.close()
            except OSError as exc:
                errors.append("%d: %s" % (ident, exc))
            if args.interval:
                time.sleep(args.interval)

    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    t0 = now_ns()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out("result " + json.dumps({"t0": t0, "t_sent": now_ns(), "errors": errors[:5], "n_errors": len(errors),
                                "connecting": connecting}))


def run_latency(args):
    """--count 64-byte records at --rate Hz, each stamped just before its send, on every address."""
    addrs = parse_addrs(args.addrs)
    socks = [connect(a, nodelay=True) for a in addrs]
    time.sleep(args.warmup)  # let the proxy finish setting up (forks, connects) before timing
    period = 1e9 / args.rate
    start = now_ns()
    pack = REC.pack
    for seq in range(args.count):
        target = start + seq * period
        while True:
            delay = target - now_ns()
            if delay <= 0:
                break
            time.sleep(delay / 1e9)
        for s in socks:
            s.sendall(pack(seq, now_ns()) + REC_PAD)
    for s in socks:
        s.close()
    out("result " + json.dumps({"t0": start, "t_sent": now_ns()}))


def run_hold(args):
    """--count sources held open together; each sends its stream in --messages pieces spread over
    --duration seconds; all close when the bench says "close"."""
    addrs = parse_addrs(args.addrs)
    t0 = now_ns()
    sources = []
    for ident in range(args.count):
        sources.append([connect(a) for a in addrs])
    out("connected %d %.3f" % (args.count, (now_ns() - t0) / 1e9))
    k = args.messages
    piece = -(-args.size // k)
    datas = [stream_bytes(i, args.size) for i in range(args.count)]
    schedule = sorted(((m + i / args.count) * args.duration / k, i, m)
                      for i in range(args.count) for m in range(k))
    start = time.monotonic()
    for at, i, m in schedule:
        delay = start + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        chunk = datas[i][m * piece:(m + 1) * piece]
        if chunk:
            for s in sources[i]:
                s.sendall(chunk)
    out("sent %.3f" % (time.monotonic() - start))
    line = sys.stdin.readline()
    t_close = now_ns()
    for socks in sources:
        for s in socks:
            s.close()
    out("result " + json.dumps({"t0": t0, "t_close": t_close, "command": line.strip()}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["sink", "bulk", "conns", "latency", "hold"])
    parser.add_argument("--mode", default="stream")
    parser.add_argument("--expect", type=int, default=1)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--no-crc", action="store_true")
    parser.add_argument("--first-bytes", action="store_true", help="sink: say when each stream's head came")
    parser.add_argument("--sizes", default="")
    parser.add_argument("--ident", type=int, default=0)
    parser.add_argument("--addrs", default="")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--interval", type=float, default=0, help="conns: a pause after each connection")
    parser.add_argument("--warmup", type=float, default=0.2)
    parser.add_argument("--messages", type=int, default=1)
    parser.add_argument("--duration", type=float, default=0)
    parser.add_argument("--tls-cert", default="")
    parser.add_argument("--tls-ca", default="")
    args = parser.parse_args()
    {"sink": run_sink, "bulk": run_bulk, "conns": run_conns, "latency": run_latency,
     "hold": run_hold}[args.role](args)


if __name__ == "__main__":
    main()
