"""Reload (SIGHUP with --config): main reads the file again; new sources get the new configuration,
live groups join the destinations added and leave those removed (membership.py). A mixin of main's
Proxy: the state is the Proxy's, these are its reload steps."""
import dataclasses
import os
import signal
import time

from socketproxy_core import endpoints
from socketproxy_core import membership
from socketproxy_core import proxylog
from socketproxy_core import tls
from socketproxy_core.pipesizes import plan_pipes
from socketproxy_core.proxylog import log
from socketproxy_core.service import notify_service_manager


class Reloading:
    """Main's reload (see the module docstring)."""

    def with_columns(self, config):
        """config with each destination's column in the table (a new name gets the next free one);
        raises UsageError when the table has no column left."""
        columns = []
        for name in endpoints.mention_names(config.dests):
            if name not in self.column_of:
                if len(self.column_of) == self.table.dests:
                    raise endpoints.UsageError("more than %d destinations named since the start (each keeps its "
                                               "counters): restart to add %s" % (self.table.dests, name))
                self.column_of[name] = len(self.column_of)
            columns.append(self.column_of[name])
        self.table.columns_used = len(self.column_of)
        return dataclasses.replace(config, columns=tuple(columns))

    def reload(self):
        """SIGHUP: read --config's file again. New sources get the new configuration; a file that does
        not parse or validate changes nothing."""
        if self.reload_config is None:
            log.info("SIGHUP ignored: no --config file to read again; serving %d sources", len(self.receivers))
            return
        notify_service_manager("RELOADING=1\nMONOTONIC_USEC=%d" % (time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000))
        try:
            config = self.with_columns(plan_pipes(kept_at_start(self.config, self.reload_config()), quiet=True))
            tls_contexts = tls.server_context(config), tls.client_contexts(config)  # renewed files are read again
        except endpoints.UsageError as exc:
            log.error("reload failed: %s; kept the running configuration", exc)
            notify_service_manager("READY=1")
            return
        changes = describe_changes(self.config, config)
        dests_changed = config.columns != self.config.columns
        self.config = config
        self.tls_context, self.tls_client = tls_contexts
        proxylog.set_level(config.log_level)
        self.title_base = title_base(config)
        self.title_shown = None
        self.update_title()
        log.info("reloaded the configuration: %s", changes or "nothing changed")
        self.retire_spares()  # forked with the configuration before: the next ones are forked with this one
        if dests_changed:  # every live group joins the destinations added and leaves those removed
            membership.write_list(self.dests_fd, config)
            for pid in self.receivers:
                try:
                    os.kill(pid, signal.SIGHUP)
                except ProcessLookupError:
                    pass
        if self.metrics_pid is not None:  # it labels the destinations: started again with the new list
            old, self.metrics_pid = self.metrics_pid, None
            os.kill(old, signal.SIGKILL)
            self.start_metrics()
        notify_service_manager("READY=1\nSTATUS=listening on port %d" % config.listen_port)


def table_columns(config):
    """Destinations the shared table holds over the life of the process (and of its upgrades): room
    for those reloads add."""
    return max(RELOAD_COLUMNS, 2 * len(config.dests))


def title_base(config):
    return "socketproxy: main %s:%d -> %s" % (config.listen_host, config.listen_port,
                                              " ".join(str(d) for d in config.dests))


# What a reload cannot change: the listening socket, the metrics socket and the table's size are made
# once, at the start (a restart, or an upgrade in place, changes them).
FIXED_AT_START = ("listen_host", "listen_port", "metrics", "max_connections")
RELOAD_COLUMNS = 16  # the table holds this many destinations at least (added by reloads)


def kept_at_start(running, config):
    """config with the settings a reload cannot change put back as they run, each one said."""
    for name in FIXED_AT_START:
        if getattr(config, name) != getattr(running, name):
            log.warning("reload: %s changed from %s to %s: not applied until a restart", name,
                        getattr(running, name), getattr(config, name))
    return dataclasses.replace(config, **{name: getattr(running, name) for name in FIXED_AT_START})


def describe_changes(old, new):
    """What a reload changed, in one line: destinations added and removed, then each setting."""
    parts = []
    old_names, new_names = endpoints.mention_names(old.dests), endpoints.mention_names(new.dests)
    added = [name for name in new_names if name not in old_names]
    removed = [name for name in old_names if name not in new_names]
    if added:
        parts.append("destinations added: %s" % " ".join(added))
    if removed:
        parts.append("destinations removed: %s" % " ".join(removed))
    overrides = {str(d): d.options for d in old.dests}
    for dest in new.dests:
        if str(dest) in overrides and overrides[str(dest)] != dest.options:
            parts.append("%s's settings %s" % (dest, ", ".join("%s=%s" % item for item in dest.options) or "default"))
    for field in dataclasses.fields(new):
        if field.name in ("dests", "columns", "pipe_size", "pipe_share", "pipes_per_source"):
            continue
        before, after = getattr(old, field.name), getattr(new, field.name)
        if before != after:
            parts.append("%s %s -> %s" % (field.name, show(before), show(after)))
    return "; ".join(parts)


def show(value):
    if isinstance(value, tuple):
        return " ".join(str(item) for item in value) or "all"
    return str(value)
