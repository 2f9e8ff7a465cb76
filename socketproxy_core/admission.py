"""What a source must show before it is served, in its receiver and before any forwarder exists (so
nothing of a refused source reaches a destination): a trusted balancer's PROXY protocol header
(--accept-proxy), --allow applied to the source it names, then the TLS handshake (--tls-cert). A
refused source is closed, said in one line, and counted by main from the receiver's row.

A mixin of receiver.Receiver: the state is the receiver's, these are its first steps.
"""
import os
import socket

import setproctitle

from socketproxy_core import endpoints
from socketproxy_core import proxylog
from socketproxy_core import proxyproto
from socketproxy_core import stats
from socketproxy_core import tls
from socketproxy_core.proxylog import log
from socketproxy_core.sockets import format_address

PROXY_HEADER_S = 5.0  # --accept-proxy: a balancer's header must be whole within this
PROXY_PEEK_S = 0.2  # --accept-proxy: how long another source's first bytes are waited for, to refuse a header


class Admission:
    """The receiver's admission of its source (see the module docstring)."""

    def admit(self):
        """Before any forwarder exists (so nothing of a refused source reaches a destination):
        --accept-proxy (a balancer's source begins with a PROXY protocol header naming the real
        source, which --allow is applied to and which names this group from then on; any other source
        must not begin with one), then the TLS handshake (--tls-cert). Whether the source is served;
        a refused one is closed, said in one line here, and counted by main."""
        proxylog.set_connection("src=%s" % self.peer)
        try:
            self.real_source = self.source.getpeername()[:2]  # (host, port): a balancer's, or the one it names
        except OSError:  # it reset its connection before we ran: nothing to serve, nothing to refuse
            log.info("the source went away before it was served")
            self.source.close()
            return False
        try:
            self.read_proxy_header()
        except proxyproto.HeaderError as exc:
            return self.refuse(stats.REFUSED_PROXY, str(exc))
        if self.real_source[0] != self.source.getpeername()[0] and not endpoints.is_allowed(
                self.real_source[0], self.config.allow):
            return self.refuse(stats.REFUSED_ALLOW, "the source it names is not in --allow")
        if self.tls_context is not None:
            try:
                self.source = tls.handshake(self.source, self.tls_context)
            except tls.HandshakeError as exc:
                return self.refuse(stats.REFUSED_TLS, str(exc))
            subject = tls.subject(self.source)
            if subject:
                self.rename("%s [%s]" % (self.peer, subject))
        self.source.settimeout(None)
        return True

    def read_proxy_header(self):
        """--accept-proxy: read a trusted balancer's header (the source it names becomes ours); refuse
        one from any other address. Raises proxyproto.HeaderError."""
        config = self.config
        if not config.accept_proxy:
            return
        if endpoints.is_allowed(self.real_source[0], config.accept_proxy):
            _, named = proxyproto.read_header(self.source, PROXY_HEADER_S)
            if named is not None:
                self.real_source = named
                self.rename("%s (via %s)" % (format_address(named), self.peer))
            return
        self.source.settimeout(PROXY_PEEK_S)
        try:
            start = self.source.recv(len(proxyproto.V2_SIGNATURE), socket.MSG_PEEK)
        except (socket.timeout, OSError):
            start = b""
        if len(start) >= 5 and (proxyproto.V1_PREFIX.startswith(start[:6]) or proxyproto.V2_SIGNATURE.startswith(start)):
            raise proxyproto.HeaderError("a PROXY protocol header from an address not in --accept-proxy")

    def rename(self, peer):
        """The source as the log and the title name it from now on."""
        self.peer = peer
        proxylog.set_connection("src=%s" % peer)
        setproctitle.setproctitle("socketproxy: receiver %s" % peer)

    def refuse(self, why, text):
        log.info("closing the source: %s; nothing of it was forwarded", text)
        self.rows.write_refused(os.getpid(), why)
        self.source.close()
        return False
