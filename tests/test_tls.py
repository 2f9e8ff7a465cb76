"""TLS sources: --tls-cert/--tls-key make the listener TLS, --tls-client-ca requires a client certificate
signed by that CA. Certificates are made here, with trustme; none is committed. Every refused source
(plaintext, no certificate, another CA's, an expired one, a handshake never finished) is closed,
counted by reason and forwards nothing."""
import datetime
import os
import signal
import re
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time

import psutil
import pytest
import trustme

from support import ROOT, connect_source, free_port, scrape, wait_for_log, wait_until


@pytest.fixture
def pki(tmp_path):
    """A CA, the proxy's certificate for 127.0.0.1, a client certificate, and their files."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("feed-7@example.test", common_name="feed-7")
    files = {}
    for name, blob in (("server.pem", server.private_key_and_cert_chain_pem), ("ca.pem", ca.cert_pem),
                       ("client.pem", client.private_key_and_cert_chain_pem)):
        path = tmp_path / name
        blob.write_to_path(str(path))
        files[name] = str(path)
    return ca, files


def tls_client(port, ca, cert_file=None, other_ca=None):
    context = ssl.create_default_context()
    (other_ca or ca).configure_trust(context)
    if cert_file:
        context.load_cert_chain(cert_file)
    return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="127.0.0.1")


def test_a_tls_source_is_decrypted_for_every_destination(proxy, recorder, pki):
    ca, files = pki
    d1, d2 = recorder(), recorder()
    px = proxy(["127.0.0.1:%d" % d1.port, "127.0.0.1:%d" % d2.port], "--tls-cert", files["server.pem"])
    data = bytes(range(256)) * 4000  # 1 MB, more than one TLS record and one read
    with tls_client(px.port, ca) as sock:
        sock.sendall(data)
        wait_until(lambda: d1.total() == d2.total() == len(data), 20, message=lambda: (d1.total(), d2.total()))
    assert d1.streams() == d2.streams() == [data]


def test_a_tls_source_that_waits_for_our_close_notify_gets_it_and_the_destinations_their_end(proxy, recorder, pki):
    """A client that ends with close_notify and waits for the proxy's (a blocking unwrap, as a careful
    TLS client does, its TCP connection still open) gets it at once, and every destination gets the
    whole stream and its end."""
    ca, files = pki
    d1, d2 = recorder(), recorder()
    px = proxy(["127.0.0.1:%d" % d1.port, "127.0.0.1:%d" % d2.port], "--tls-cert", files["server.pem"])
    data = bytes(range(256)) * 400
    sock = tls_client(px.port, ca)
    try:
        sock.sendall(data)
        sock.settimeout(5)
        plain = sock.unwrap()  # sends ours, then waits for the proxy's close_notify
        plain.close()
    finally:
        sock.close()
    wait_until(lambda: d1.closed_count() == d2.closed_count() == 1, 20, message=lambda: px.log()[-2000:])
    assert d1.streams() == d2.streams() == [data]
    wait_for_log(px.log_path, r"group ended: source closed; received %d bytes" % len(data))


def test_an_idle_tls_source_is_closed_by_idle_timeout_and_its_group_ends_cleanly(proxy, recorder, pki):
    """--idle-timeout on a TLS source: its receiver closes it (its socket shut down first) and exits 0,
    its forwarder delivers what came before; nothing is killed, no traceback."""
    ca, files = pki
    dest = recorder()
    px = proxy(["127.0.0.1:%d" % dest.port], "--tls-cert", files["server.pem"], "--idle-timeout", "1")
    with tls_client(px.port, ca) as sock:
        sock.sendall(b"then silence\n")
        wait_for_log(px.log_path, r"group ended: .*idle", timeout=20)
    wait_until(lambda: dest.streams() == [b"then silence\n"] and dest.closed_count() == 1, 20)
    wait_for_log(px.log_path, r"receiver \d+ for 127\.0\.0\.1:\d+ ended: exit status 0")
    assert "Traceback" not in px.log() and "killed" not in px.log(), px.log()[-2000:]


def test_mutual_tls_names_the_client_and_refuses_the_rest(proxy, recorder, pki, tmp_path):
    """--tls-client-ca: a client with a certificate of that CA is served, its subject in the log; no
    certificate, another CA's, an expired one, plaintext and a handshake never finished are closed, each
    counted as refused for tls, and nothing of them reaches the destination."""
    ca, files = pki
    dest = recorder()
    metrics_port = free_port()
    px = proxy(["127.0.0.1:%d" % dest.port], "--tls-cert", files["server.pem"], "--tls-client-ca", files["ca.pem"],
               "--metrics", "127.0.0.1:%d" % metrics_port)
    with tls_client(px.port, ca, files["client.pem"]) as sock:
        sock.sendall(b"from feed-7\n")
        wait_until(lambda: dest.streams() == [b"from feed-7\n"], 20, message=lambda: px.log()[-2000:])
    wait_for_log(px.log_path, r"src=127\.0\.0\.1:\d+ \[.*commonName=feed-7.*\] accepted")
    other = trustme.CA()
    stranger = other.issue_cert("intruder", common_name="intruder")
    stranger_file = tmp_path / "stranger.pem"
    stranger.private_key_and_cert_chain_pem.write_to_path(str(stranger_file))
    expired = ca.issue_cert("old", common_name="old", not_after=datetime.datetime.now(datetime.timezone.utc)
                            - datetime.timedelta(days=1))
    expired_file = tmp_path / "expired.pem"
    expired.private_key_and_cert_chain_pem.write_to_path(str(expired_file))
    refused = 0
    for cert_file in (None, str(stranger_file), str(expired_file)):
        try:
            with tls_client(px.port, ca, cert_file) as sock:
                sock.sendall(b"must not pass\n")
                sock.recv(10)  # TLS 1.3: the refusal arrives after the handshake, as an alert
        except (ssl.SSLError, OSError):
            pass
        refused += 1
    with connect_source(px.port) as sock:  # plaintext
        sock.sendall(b"GET / HTTP/1.0\r\n\r\nmust not pass\n")
        sock.settimeout(10)
        try:
            sock.recv(100)
        except OSError:
            pass
    refused += 1
    slow = connect_source(px.port)  # slowloris: connects, never completes a handshake
    refused += 1
    try:
        key = ("socketproxy_sources_refused_total", (("reason", "tls"),))
        wait_until(lambda: scrape(metrics_port).get(key) == refused, 30,
                   message=lambda: "%r\n%s" % (scrape(metrics_port).get(key), px.log()[-3000:]))
    finally:
        slow.close()
    assert dest.streams() == [b"from feed-7\n"]
    log = px.log()
    assert "no TLS handshake within 5.0 s" in log
    assert re.search(r"certificate", log)


def test_a_bad_certificate_file_is_one_line_and_exit_1(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "socketproxy.py"), "--listen-port", str(free_port()),
                           "--tls-cert", str(bad), "127.0.0.1:9"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line]
    assert len(lines) == 1 and "cannot use --tls-cert %s" % bad in lines[0] and "Traceback" not in done.stderr


class TLSDestination:
    """A destination speaking TLS with a certificate for 127.0.0.1 (issued by ca), recording what each
    connection delivers after its handshake, and how it ended ("close_notify", "eof" without one,
    "reset"); handshakes that fail are counted."""

    def __init__(self, ca, name="127.0.0.1", port=0, handshake_delay=0.0, read_rate=None):
        self.handshake_delay = handshake_delay  # seconds between accept and the handshake (a slow server)
        self.read_rate = read_rate  # bytes per second, None = as fast as it can
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(name).configure_cert(self.context)
        self.context.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF  # an end without close_notify is told apart
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if read_rate:  # inherited by accepted connections: a small window holds little unread data
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.streams, self.ends, self.failed, self.conns = [], [], [], []
        self.accepting = threading.Thread(target=self.accept, daemon=True)
        self.accepting.start()

    def accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        conn.settimeout(30)
        time.sleep(self.handshake_delay)
        try:
            tls_conn = self.context.wrap_socket(conn, server_side=True, suppress_ragged_eofs=False)
        except (ssl.SSLError, OSError) as exc:
            self.failed.append(repr(exc))
            conn.close()
            return
        self.conns.append(tls_conn)
        data = bytearray()
        self.streams.append(data)
        try:
            while True:
                chunk = tls_conn.recv(int(self.read_rate * 0.05) if self.read_rate else 65536)
                if not chunk:
                    self.ends.append("close_notify")
                    break
                data += chunk
                if self.read_rate:
                    time.sleep(len(chunk) / self.read_rate)
        except ssl.SSLError as exc:
            self.ends.append("eof" if "UNEXPECTED_EOF" in str(exc) else "reset")
        except OSError:
            self.ends.append("reset")
        tls_conn.close()

    def stop(self):
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (close alone would not)
        except OSError:
            pass
        self.listener.close()

    def kill(self):
        """Go down as a killed server does: no more accepts, every connection reset."""
        self.stop()
        for conn in self.conns:
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                socket.socket.shutdown(conn, socket.SHUT_RDWR)  # its reader wakes, and closes it: a reset
            except OSError:
                pass


def test_a_tls_destination_gets_the_stream_encrypted_and_verified(proxy, recorder, pki):
    ca, files = pki
    plain = recorder()
    secure = TLSDestination(ca)
    try:
        px = proxy(["127.0.0.1:%d" % plain.port, "tls://127.0.0.1:%d" % secure.port], "--tls-ca", files["ca.pem"])
        data = bytes(range(256)) * 4000
        with connect_source(px.port) as sock:
            sock.sendall(data)
            wait_until(lambda: secure.streams and len(secure.streams[0]) == len(data), 20,
                       message=lambda: ([len(s) for s in secure.streams], secure.failed, px.log()[-2000:]))
        assert bytes(secure.streams[0]) == data and plain.streams() == [data]
        wait_for_log(px.log_path, r"dst=tls://127\.0\.0\.1:%d forwarder done: sent %d bytes, dropped 0 bytes"
                     % (secure.port, len(data)))
        wait_until(lambda: secure.ends == ["close_notify"], 20, message=lambda: secure.ends)  # a clean TLS end
    finally:
        secure.stop()


@pytest.mark.parametrize("buffer", ["4M", "0"])
def test_a_slow_tls_destination_that_makes_progress_is_never_dropped(proxy, recorder, pki, buffer):
    """A tls:// destination reading 200 kB/s through a small window, sent 1.2 MB (over twice what the
    socket buffers hold): TLS writes that would block are retried with the same bytes, progress is
    the ciphertext acknowledged, so --send-timeout (2 s) never fires; it gets every byte, and so does a
    fast plain destination."""
    ca, files = pki
    fast = recorder()
    slow = TLSDestination(ca, read_rate=200_000)
    try:
        px = proxy(["127.0.0.1:%d" % fast.port, "tls://127.0.0.1:%d" % slow.port], "--tls-ca", files["ca.pem"],
                   "--send-timeout", "2", "--buffer", buffer)
        data = os.urandom(1_200_000)
        with connect_source(px.port) as sock:
            sock.sendall(data)
        wait_until(lambda: slow.ends == ["close_notify"], 40,
                   message=lambda: ([len(s) for s in slow.streams], slow.ends, px.log()[-2000:]))
        assert bytes(slow.streams[0]) == data and fast.streams() == [data]
        assert "send timeout" not in px.log() and "no progress" not in px.log()
        wait_for_log(px.log_path, r"dst=tls://127.0.0.1:%d forwarder done: sent %d bytes, dropped 0 bytes"
                     % (slow.port, len(data)))
    finally:
        slow.stop()


@pytest.mark.parametrize("buffer, size", [("1M", 8 << 20), ("0", 8 << 20), ("1M", 100_000)])
def test_a_slow_first_handshake_holds_the_source_and_loses_nothing_of_the_start(proxy, recorder, pki, buffer, size):
    """A tls:// destination that takes a second to begin its handshake, while the source sends 8 MiB the
    moment it connects: more than --buffer, so the first attempt keeps what the backlog holds, then
    holds the source (within --send-timeout) instead of dropping the stream's start; or 100 kB and
    closes, during the handshake. Both destinations get every byte."""
    ca, files = pki
    plain = recorder()
    slow = TLSDestination(ca, handshake_delay=1.0)
    try:
        px = proxy(["127.0.0.1:%d" % plain.port, "tls://127.0.0.1:%d" % slow.port], "--tls-ca", files["ca.pem"],
                   "--buffer", buffer)
        data = os.urandom(size)
        with connect_source(px.port) as sock:
            sock.sendall(data)
        wait_until(lambda: slow.ends == ["close_notify"] and plain.closed_count() == 1, 30,
                   message=lambda: (slow.ends, [len(s) for s in slow.streams], px.log()[-2000:]))
        assert bytes(slow.streams[0]) == data and plain.streams() == [data]
        wait_for_log(px.log_path, r"dst=tls://127.0.0.1:%d forwarder done: sent %d bytes, dropped 0 bytes"
                     % (slow.port, len(data)))
    finally:
        slow.stop()


def test_a_tls_destination_restarted_resumes_at_a_record_boundary_with_nothing_lost(proxy, recorder, pki):
    """--framing line --buffer through TLS: a destination killed mid-stream and started again on the
    same port gets, on its new connection, every record from right after the last one it read, whole
    and in order; what TLS was handed but the kernel had not delivered is resent, never lost."""
    from test_records import Lines, records
    ca, files = pki
    steady = recorder()
    flaky = TLSDestination(ca)
    port = flaky.port
    px = proxy(["127.0.0.1:%d" % steady.port, "tls://127.0.0.1:%d" % port], "--tls-ca", files["ca.pem"],
               "--framing", "line", "--buffer", "4M", "--retry-interval", "0.5")
    source = Lines(px.port)
    back = None
    try:
        wait_until(lambda: flaky.streams and len(flaky.streams[0]) > 9000, 20, message=lambda: px.log()[-2000:])
        flaky.kill()
        wait_for_log(px.log_path, r"disconnected from tls://127.0.0.1:%d" % port)
        sent_during_outage = source.count
        wait_until(lambda: source.count > sent_during_outage + 200)
        back = TLSDestination(ca, port=port)
        wait_until(lambda: back.streams and len(back.streams[0]) > 9000, 20, message=lambda: px.log()[-2000:])
    finally:
        source.stop()
    try:
        wait_until(lambda: back.ends == ["close_notify"], 20, message=lambda: (back.ends, px.log()[-2000:]))
        wait_until(lambda: steady.closed_count() == 1)
        assert records(steady.streams()[0]) == list(range(source.count))
        old = records(bytes(flaky.streams[0]))
        new = records(bytes(back.streams[0]))
        assert old == list(range(len(old)))
        assert new == list(range(new[0], source.count)), "gap or reorder after the restart"
        assert old[-1] - 300 < new[0] <= old[-1] + 1, "lost records: the new stream starts at %d, the old one ended " \
            "at %d" % (new[0], old[-1])
        wait_for_log(px.log_path, r"dst=tls://127.0.0.1:%d forwarder done: sent \d+ bytes, dropped 0 bytes "
                     r"\(0 records\)" % port)
    finally:
        flaky.stop()
        back.stop()


@pytest.mark.parametrize("problem", ["another CA", "another name"])
def test_a_tls_destination_that_does_not_verify_is_a_failed_connect_never_plaintext(proxy, recorder, pki, problem):
    ca, files = pki
    secure = TLSDestination(trustme.CA() if problem == "another CA" else ca,
                            name="127.0.0.1" if problem == "another CA" else "elsewhere.example")
    try:
        px = proxy(["tls://127.0.0.1:%d" % secure.port], "--tls-ca", files["ca.pem"], "--retry-interval", "0.5")
        with connect_source(px.port) as sock:
            sock.sendall(b"secret\n")
            wait_for_log(px.log_path, r"WARNING .*cannot connect to tls://127\.0\.0\.1:%d: TLS: (unable to get local "
                         r"issuer certificate|IP address mismatch)" % secure.port)
            wait_until(lambda: len(secure.failed) >= 2, 20, message=lambda: secure.failed)  # retried
        assert secure.streams == []  # no byte in clear, ever
    finally:
        secure.stop()


def client_hello():
    """The first bytes a real TLS client sends (its ClientHello), captured from an ssl.MemoryBIO."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_object = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    try:
        tls_object.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def test_truncated_and_random_records_reach_no_destination_and_crash_nothing(proxy, recorder, pki):
    """40 sources send a ClientHello cut at random, random bytes, or a ClientHello followed by garbage,
    then close: each is refused (counted for tls), nothing reaches the destination, and the proxy goes
    on serving a real TLS client."""
    import random
    ca, files = pki
    dest = recorder()
    metrics_port = free_port()
    px = proxy(["127.0.0.1:%d" % dest.port], "--tls-cert", files["server.pem"], "--metrics",
               "127.0.0.1:%d" % metrics_port)
    hello = client_hello()
    rng = random.Random(7)
    payloads = [hello[:rng.randint(1, len(hello) - 1)] for _ in range(15)]
    payloads += [rng.randbytes(rng.randint(1, 3000)) for _ in range(15)]
    payloads += [hello + rng.randbytes(rng.randint(1, 500)) for _ in range(10)]
    for payload in payloads:
        with connect_source(px.port) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(10)
            try:
                while sock.recv(4096):
                    pass
            except OSError:
                pass
    key = ("socketproxy_sources_refused_total", (("reason", "tls"),))
    wait_until(lambda: scrape(metrics_port).get(key) == len(payloads), 30,
               message=lambda: "%r\n%s" % (scrape(metrics_port).get(key), px.log()[-2000:]))
    assert dest.streams() == []
    assert "Traceback" not in px.log()
    with tls_client(px.port, ca) as sock:
        sock.sendall(b"still served\n")
        wait_until(lambda: dest.streams() == [b"still served\n"], 20)


def write_config(path, port, destinations, extra=""):
    path.write_text("listen_port = %d\n%sdestinations = [\n%s]\n" % (port, extra, "".join(
        "    %s,\n" % item for item in destinations)))


def test_each_tls_destination_has_its_own_ca_and_client_certificate_in_the_config_file(proxy, pki, tmp_path):
    """Two tls:// destinations, each verified against its own CA from the config file (no --tls-ca),
    one of them asking for a client certificate (tls_dest_cert); a third names a CA that did not issue
    its certificate: it is refused (a failed connect), the other two get the stream."""
    ca, files = pki
    other_ca = trustme.CA()
    other_ca_file = tmp_path / "other-ca.pem"
    other_ca.cert_pem.write_to_path(str(other_ca_file))
    first = TLSDestination(ca)
    second = TLSDestination(other_ca)
    second.context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: only a client certificate of ca passes
    ca.configure_trust(second.context)
    wrong = TLSDestination(other_ca)
    port = free_port()
    path = tmp_path / "proxy.toml"
    write_config(path, port, [
        '{ address = "tls://127.0.0.1:%d", tls_ca = "%s" }' % (first.port, files["ca.pem"]),
        '{ address = "tls://127.0.0.1:%d", tls_ca = "%s", tls_dest_cert = "%s" }' % (
            second.port, other_ca_file, files["client.pem"]),
        '{ address = "tls://127.0.0.1:%d", tls_ca = "%s" }' % (wrong.port, files["ca.pem"])],
        'retry_interval = 0.5\n')
    try:
        px = proxy([], "--config", str(path), listen_port=port)
        data = b"for each its own CA\n" * 1000
        with connect_source(px.port) as sock:
            sock.sendall(data)
            wait_until(lambda: [bytes(s) for s in first.streams] == [data] and
                       [bytes(s) for s in second.streams] == [data], 20,
                       message=lambda: (first.failed, second.failed, px.log()[-2000:]))
            wait_for_log(px.log_path, r"WARNING .*cannot connect to tls://127\.0\.0\.1:%d: TLS: unable to get local "
                         r"issuer certificate" % wrong.port)
        assert wrong.streams == []
    finally:
        for dest in (first, second, wrong):
            dest.stop()


def test_a_bad_per_destination_tls_setting_is_one_line(tmp_path):
    path = tmp_path / "proxy.toml"
    write_config(path, free_port(), ['{ address = "127.0.0.1:9", tls_ca = "/etc/ssl/certs/ca-certificates.crt" }'])
    done = subprocess.run([sys.executable, os.path.join(ROOT, "socketproxy.py"), "--check-config", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "destination 127.0.0.1:9: tls_ca, tls_dest_cert and tls_dest_key are for tls://HOST:PORT" in done.stderr
    write_config(path, free_port(), ['{ address = "tls://127.0.0.1:9", tls_ca = "%s" }' % (tmp_path / "missing.pem")])
    done = subprocess.run([sys.executable, os.path.join(ROOT, "socketproxy.py"), "--check-config", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "cannot use --tls-ca %s" % (tmp_path / "missing.pem") in done.stderr and "Traceback" not in done.stderr


def test_a_tls_destination_added_by_a_reload_to_a_live_group_speaks_tls(proxy, recorder, pki, tmp_path):
    """A group forked before any tls:// destination existed joins one a reload adds: its forwarder makes
    the context from the destination's settings, and the destination gets TLS, never plaintext."""
    ca, files = pki
    plain = recorder()
    secure = TLSDestination(ca)
    port = free_port()
    path = tmp_path / "proxy.toml"
    write_config(path, port, ['"127.0.0.1:%d"' % plain.port], 'tls_ca = "%s"\n' % files["ca.pem"])
    try:
        px = proxy([], "--config", str(path), listen_port=port)
        with connect_source(px.port) as sock:
            sock.sendall(b"before\n")
            wait_until(lambda: plain.total() == 7, 20)
            write_config(path, port, ['"127.0.0.1:%d"' % plain.port, '"tls://127.0.0.1:%d"' % secure.port],
                         'tls_ca = "%s"\n' % files["ca.pem"])
            os.kill(px.pid, signal.SIGHUP)
            wait_for_log(px.log_path, r"connected to tls://127\.0\.0\.1:%d" % secure.port)
            sock.sendall(b"after\n")
            wait_until(lambda: [bytes(s) for s in secure.streams] == [b"after\n"], 20,
                       message=lambda: (secure.streams, secure.failed, px.log()[-2000:]))
        assert secure.failed == []
    finally:
        secure.stop()


def test_a_spare_group_refuses_a_tls_source_then_serves_the_next_with_its_own_proxy_header(proxy, recorder, pki):
    """--spare-groups: a source refused in the handshake leaves the group waiting, unchanged; the next
    source through the same group gets its own PROXY header, not the one before's."""
    ca, files = pki
    d1 = recorder()
    px = proxy(["127.0.0.1:%d" % d1.port], "--tls-cert", files["server.pem"], "--tls-client-ca", files["ca.pem"],
               "--send-proxy", "v1", "--spare-groups", "1")

    def spare():
        kids = psutil.Process(px.pid).children()
        titles = [" ".join(kid.cmdline()) for kid in kids]
        return kids[0] if len(kids) == 1 and "receiver (spare)" in titles[0] and len(kids[0].children()) == 1 else None

    group = wait_until(spare)
    fds = (group.num_fds(), group.children()[0].num_fds())
    with pytest.raises((ssl.SSLError, OSError)):
        with tls_client(px.port, ca) as sock:  # no client certificate
            sock.sendall(b"refused\n")
            sock.recv(1)
    wait_for_log(px.log_path, "TLS handshake failed")
    ports = []
    for n in range(2):
        with tls_client(px.port, ca, files["client.pem"]) as sock:
            ports.append(sock.getsockname()[1])
            sock.sendall(b"served %d\n" % n)
        wait_until(lambda: d1.closed_count() == n + 1)
    assert d1.streams() == [b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\nserved %d\n" % (port, px.port, n)
                            for n, port in enumerate(ports)]
    assert wait_until(spare).pid == group.pid
    assert (group.num_fds(), group.children()[0].num_fds()) == fds
