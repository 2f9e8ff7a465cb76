"""Fixtures: proxies and recording destinations that are always cleaned up, whole trees included."""
import psutil
import pytest

from support import Recorder, alive, become_subreaper, kill_tree, reap_orphans, start_proxy

PROJECT_MARKERS = ("socketproxy", "fakes.", "fake-source", "fake-destination")


def project_descendants():
    """Our descendants that run project code (a killed proxy's orphans are adopted by us)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if any(marker in " ".join(proc.cmdline()) for marker in PROJECT_MARKERS):
                found.append(proc)
        except psutil.Error:
            pass
    return found


@pytest.fixture(scope="session", autouse=True)
def subreaper():
    become_subreaper()
    yield
    reap_orphans()


@pytest.fixture(autouse=True)
def no_leaked_processes():
    """After every test: nothing of the project's left running, and no zombie of ours."""
    yield
    survivors = kill_tree(project_descendants())
    zombies = [p for p in psutil.Process().children() if p.status() == psutil.STATUS_ZOMBIE]
    reap_orphans()
    assert not survivors, "processes survived SIGKILL: %s" % survivors
    assert not zombies, "zombies left: %s" % zombies


@pytest.fixture
def recorder():
    """Factory of recording destinations, stopped at teardown."""
    made = []

    def make(**kwargs):
        rec = Recorder(**kwargs)
        made.append(rec)
        return rec

    yield make
    for rec in made:
        rec.stop()


class ProxyHandle:
    """A running proxy: its Popen, port, log path, and every process of its tree ever seen."""

    def __init__(self, proc, port, log_path):
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.pid = proc.pid

    def log(self):
        return self.log_path.read_text()


@pytest.fixture
def proxy(tmp_path):
    """Factory: proxy(dests, *options) starts socketproxy.py; every tree is killed at teardown."""
    started = []

    def start(dests, *options, **kwargs):
        proc, port, log_path = start_proxy(tmp_path, [str(d) for d in dests], *options,
                                           name="proxy%d" % len(started), **kwargs)
        handle = ProxyHandle(proc, port, log_path)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        try:
            procs = [psutil.Process(handle.pid)] + psutil.Process(handle.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        kill_tree(procs)
        if handle.proc.poll() is None:
            handle.proc.kill()
        handle.proc.wait(10)
        assert not alive(procs)
