"""TLS sources (--tls-cert, --tls-key, --tls-client-ca): the standard library's ssl, TLS 1.2 or later.

Main builds the context (a bad certificate or key is one line and exit 1 at start, or a failed reload);
each receiver does its own source's handshake, within TLS_HANDSHAKE_S, before any forwarder exists,
so nothing of a source that does not complete it reaches a destination. A decrypted stream cannot be
spliced: the receiver reads it into memory and writes it to the pipes from there (fanout.fan_out).
"""
import os
import select
import socket
import ssl

from socketproxy_core import endpoints
from socketproxy_core.endpoints import UsageError

TLS_HANDSHAKE_S = 5.0  # a source that has not finished its handshake by then is closed (slowloris)
RECORD = 16 * 1024  # the most a TLS record holds


def server_context(config):
    """The listener's context for config, None without --tls-cert; raises UsageError naming the file."""
    if not config.tls_cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key or None)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError("cannot use --tls-cert %s / --tls-key %s: %s" % (
            config.tls_cert, config.tls_key or "(in the same file)", reason(exc))) from None
    if config.tls_client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_verify_locations(cafile=config.tls_client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError("cannot use --tls-client-ca %s: %s" % (config.tls_client_ca, reason(exc))) from None
    return context


def reason(exc):
    return getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or exc.strerror or str(exc)


class HandshakeError(Exception):
    """The source did not complete a TLS handshake we accept; the message says why."""


def handshake(sock, context, timeout=TLS_HANDSHAKE_S):
    """The source's TLS socket once its handshake is done (blocking, within timeout); the client
    certificate is verified when the context asks for one. Raises HandshakeError."""
    sock.settimeout(timeout)
    try:
        return context.wrap_socket(sock, server_side=True)
    except socket.timeout:
        raise HandshakeError("no TLS handshake within %.1f s" % timeout) from None
    except ssl.SSLCertVerificationError as exc:
        raise HandshakeError("its client certificate is refused: %s" % reason(exc)) from None
    except ssl.SSLError as exc:
        raise HandshakeError("TLS handshake failed: %s" % reason(exc)) from None
    except OSError as exc:
        raise HandshakeError("the source failed during the TLS handshake: %s" % (exc.strerror or exc)) from None


def subject(tls_sock):
    """The client certificate's subject as CN=..., O=... ("" without one)."""
    cert = tls_sock.getpeercert() or {}
    return ", ".join("%s=%s" % pair for rdn in cert.get("subject", ()) for pair in rdn)


def recv_into(tls_sock):
    """A recv_into for the non-blocking TLS source that speaks as a plain socket's: BlockingIOError
    while the next record is not whole, 0 at its end (a close_notify, or a close without one)."""
    def read(buffer):
        try:
            return tls_sock.recv_into(buffer)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError from None
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return 0
    return read


# -- tls:// destinations ---------------------------------------------------------------------------

def client_contexts(config):
    """The contexts of tls:// destinations, one per distinct (--tls-ca, --tls-dest-cert, --tls-dest-key),
    a destination's own settings in the config file over the command line's: {settings: context}.
    Made in main, once (loading the system's CAs takes milliseconds: not in every forwarder); a bad
    file raises UsageError naming it."""
    contexts = {}
    for dest in config.dests:
        if dest.tls:
            settings = client_settings(endpoints.for_destination(config, dest))
            if settings not in contexts:
                contexts[settings] = client_context(*settings)
    return contexts


def client_settings(config):
    return config.tls_ca, config.tls_dest_cert, config.tls_dest_key


def context_for(contexts, config):
    """A forwarder's context (config: its destination's): main's, or made here for a destination
    that a reload added with settings main had no context for when this group was forked."""
    settings = client_settings(config)
    return (contexts or {}).get(settings) or client_context(*settings)


def client_context(ca, dest_cert, dest_key):
    """Their certificate and name are verified, against ca or the system's CAs; dest_cert is offered
    when one is asked for."""
    try:
        context = ssl.create_default_context(cafile=ca or None)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError("cannot use --tls-ca %s: %s" % (ca, reason(exc))) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if dest_cert:
        try:
            context.load_cert_chain(dest_cert, dest_key or None)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError("cannot use --tls-dest-cert %s: %s" % (dest_cert, reason(exc))) from None
    return context


class Plaintext:
    """A tls:// destination's bytes read from the pipe and not yet taken by TLS. A TLS write that
    would block must be retried with the same bytes, so they wait here (one read of the pipe at
    most); they count as handed to the destination only once TLS has taken them, a record at a
    time (a write is all or nothing: a larger one would count nothing until all of it was taken,
    and a slow destination's progress would not show)."""

    def __init__(self):
        self.pending = memoryview(b"")

    def __len__(self):
        return len(self.pending)

    def read(self, pipe_fd, count):
        """Read up to count bytes of the pipe (BlockingIOError when it is empty); 0 at its end."""
        self.pending = memoryview(os.read(pipe_fd, count))
        return len(self.pending)

    def read_exactly(self, pipe_fd, count):
        """Read count bytes the pipe is known to hold (the retaining path's tee'd bytes)."""
        data = bytearray()
        while len(data) < count:
            data += os.read(pipe_fd, count - len(data))
        self.pending = memoryview(data)

    def send(self, tls_sock):
        """Hand what waits to TLS; raises WOULD_BLOCK (nothing taken) or OSError."""
        sent = tls_sock.send(self.pending[:RECORD])
        self.pending = self.pending[sent:]
        return sent

    def clear(self):
        """The connection is gone: returns how many bytes were never taken."""
        count = len(self.pending)
        self.pending = memoryview(b"")
        return count


def close_notify(tls_sock):
    """Our close_notify, then our FIN: the destination sees a clean TLS end, not a truncation. The
    TLS object stays (unless the destination's close_notify has come) to read what it still sends."""
    try:
        tls_sock.unwrap()
    except (ssl.SSLError, OSError, ValueError):
        pass  # non-blocking: ours is sent, theirs not read yet (SSLWantReadError); the socket failed; or
        # the TLS object is gone already (a shutdown of the socket drops it: ValueError)
    try:
        socket.socket.shutdown(tls_sock, socket.SHUT_WR)
    except OSError:
        pass


class ClientHandshake:
    """A tls:// destination's handshake on the forwarder's loop, within timeout: done(tls socket) or
    failed(reason); a certificate or name that does not verify is a failed attempt like a refused
    connection (retried with backoff), never a plaintext fallback."""

    def __init__(self, loop, sock, context, hostname, timeout, done, failed):
        self.loop, self.done, self.failed = loop, done, failed
        self.sock = context.wrap_socket(sock, server_hostname=hostname, do_handshake_on_connect=False)
        self.timeout = timeout

    def start(self):
        """Begin (apart from the constructor, so the caller holds it before done or failed can run)."""
        self.loop.set_timer("handshake", self.timeout, lambda: self.fail("no TLS handshake within %.1f s" % self.timeout))
        self.step(0)

    def step(self, _event):
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.loop.watch(self.sock, select.POLLIN, self.step)
            return
        except ssl.SSLWantWriteError:
            self.loop.watch(self.sock, select.POLLOUT, self.step)
            return
        except ssl.SSLCertVerificationError as exc:
            self.fail("TLS: %s" % reason(exc))
            return
        except (ssl.SSLError, OSError) as exc:
            self.fail("TLS handshake failed: %s" % reason(exc))
            return
        self.finish()
        self.done(self.sock)

    def fail(self, why):
        self.abort()
        self.failed(why)

    def abort(self):
        """Give the handshake up, saying nothing."""
        self.finish()
        self.sock.close()

    def finish(self):
        self.loop.unwatch(self.sock)
        self.loop.cancel("handshake")
