"""--metrics HOST:PORT: a process that serves the Prometheus text format from the shared counters.

It is a child of main like the receivers, so main never runs a thread (main forks, and a fork
copies no thread but may copy a lock one held). It reads the shared table (stats.Table) at each
scrape and writes nothing anywhere: the counters live in that table, not in files per process.
"""
import http.server
import select
import signal

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import MetricsHandler

from socketproxy_core import endpoints
from socketproxy_core import loop
from socketproxy_core import stats

PREFIX = "socketproxy_"
SCRAPE_TIMEOUT_S = 10.0


class TableCollector:
    """Every metric, from one consistent snapshot of the table."""

    def __init__(self, table, config):
        self.table = table
        # A destination named twice gets one series per mention: "HOST:PORT", then "HOST:PORT#2".
        self.dests = endpoints.mention_names(config.dests)
        self.columns = config.columns or range(len(config.dests))  # each one's column in the table
        self.framed = config.framing != "none"
        self.resp = config.framing == "resp"
        self.roles = ["primary" if config.primary and index == 0 else "mirror" if config.primary else "destination"
                      for index in range(len(config.dests))]

    def collect(self):
        main, totals, states, backlogs = self.table.snapshot()
        yield CounterMetricFamily(PREFIX + "sources_accepted", "Sources accepted and served.",
                                  value=main["accepted"])
        refused = CounterMetricFamily(PREFIX + "sources_refused", "Sources closed at once, by reason.",
                                      labels=["reason"])
        refused.add_metric(["not_allowed"], main["refused_allow"])
        refused.add_metric(["max_connections"], main["refused_full"])
        refused.add_metric(["tls"], main["refused_tls"])
        refused.add_metric(["proxy_protocol"], main["refused_proxy"])
        yield refused
        yield GaugeMetricFamily(PREFIX + "sources_active", "Sources being served now.", value=main["active"])
        yield GaugeMetricFamily(PREFIX + "spare_groups", "Groups waiting for a source (--spare-groups).",
                                value=main["spares"])
        yield CounterMetricFamily(PREFIX + "received_bytes", "Bytes received from sources.",
                                  value=main["received"])
        yield CounterMetricFamily(PREFIX + "group_kills", "Groups killed because one of their processes died "
                                  "(fate sharing).", value=main["group_kills"])
        families = {
            "sent": CounterMetricFamily(PREFIX + "destination_sent_bytes", "Bytes delivered to the destination "
                                        "(handed to its connection and not lost with it).", labels=["destination"]),
            "dropped": CounterMetricFamily(PREFIX + "destination_dropped_bytes", "Bytes a destination never got.",
                                           labels=["destination"]),
            "connect_failures": CounterMetricFamily(PREFIX + "destination_connect_failures",
                                                    "Connection attempts that failed.", labels=["destination"]),
            "reconnects": CounterMetricFamily(PREFIX + "destination_reconnects",
                                              "Connections made again after one was up.", labels=["destination"]),
            "resent": CounterMetricFamily(PREFIX + "destination_resent_bytes", "Bytes sent again after a reconnect "
                                          "that the destination had acknowledged before (to resend a cut record "
                                          "whole); not counted in sent.", labels=["destination"]),
        }
        if self.resp:
            families["error_replies"] = CounterMetricFamily(
                PREFIX + "destination_error_replies", "Error replies the destination sent (--framing resp).",
                labels=["destination"])
        if "mirror" in self.roles and self.resp:
            families["mismatches"] = CounterMetricFamily(
                PREFIX + "mirror_reply_mismatches", "Replies of a shadow that differ from the primary's reply to "
                "the same command (--primary --framing resp).", labels=["destination"])
        if "mirror" in self.roles:
            families["abandoned"] = CounterMetricFamily(
                PREFIX + "mirror_sessions_abandoned", "Source sessions a mirror stopped mirroring: its connection "
                "was cut in the middle and the session could not be restored there.", labels=["destination"])
        if self.framed:
            families["dropped_records"] = CounterMetricFamily(
                PREFIX + "destination_dropped_records", "Whole records a destination never got.",
                labels=["destination"])
        up = GaugeMetricFamily(PREFIX + "destination_connections_up", "Connections to the destination up now "
                               "(one per source when all is well).", labels=["destination"])
        down = GaugeMetricFamily(PREFIX + "destination_connections_down", "Forwarders whose destination is "
                                 "down now.", labels=["destination"])
        kept = GaugeMetricFamily(PREFIX + "destination_backlog_bytes", "Bytes kept for the destination while it "
                                 "is down (--buffer), to be sent when it is back.", labels=["destination"])
        info = GaugeMetricFamily(PREFIX + "destination_info", "Each destination's role: primary (its replies go "
                                 "back to the source, --primary), mirror, or destination.", labels=["destination", "role"])
        for index, dest in enumerate(self.dests):
            column = self.columns[index]
            kept.add_metric([dest], backlogs[column])
            info.add_metric([dest, self.roles[index]], 1)
            for name, family in families.items():
                family.add_metric([dest], totals[column][name])
            up.add_metric([dest], sum(states[column].count(state) for state in stats.CONNECTED_STATES))
            down.add_metric([dest], states[column].count(stats.STATE_DOWN))
        yield from families.values()
        yield up
        yield down
        yield kept
        yield info


class Server(http.server.HTTPServer):
    """One request at a time, in the process's loop: a scrape is a snapshot of a table in memory."""

    def __init__(self, sock, handler):
        super().__init__(sock.getsockname()[:2], handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock  # bound and listening already, by main (which reports a bind error)


def serve(sock, table, config, lifeline_fd):
    """Body of the metrics process: one loop over the listener and the lifeline, serving until main
    is gone (its end of the lifeline closes).

    Stop signals are ignored: a stop that signals every process at once (systemd's) must not end
    it before main, which would log that death; main ends it when it stops, and nothing is lost.
    A client that connects and sends nothing holds the loop for SCRAPE_TIMEOUT_S at most.
    """
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(TableCollector(table, config))
    handler = MetricsHandler.factory(registry)
    handler.timeout = SCRAPE_TIMEOUT_S
    server = Server(sock, handler)
    poller = loop.Poller()
    poller.watch(sock, select.POLLIN)
    poller.watch(lifeline_fd, select.POLLIN)
    while True:
        for fd, _ in poller.events(None):
            if fd == lifeline_fd:
                server.server_close()
                return 0
            server.handle_request()
