# -*- test-case-name: tests.test_dbrunner -*-
"""
Where the stores' database calls run: L{IDatabaseRunner.run} takes a function of a connection and
returns a L{Deferred} of its result.

  - L{ThreadedRunner} (the service): a thread pool with one connection per thread, so no database
    call blocks the reactor; results are delivered on the reactor thread.
  - L{SynchronousRunner} (unit tests, the C{tunnelkit admin} commands, the service's start-up before
    the reactor runs): one connection, each call made at once in the calling thread, its Deferred
    already fired.  Tests stay deterministic and sleep-free: C{successResultOf(store.get_tunnel(...))}.

A connection whose database went away (PostgreSQL restarted, a network cut) is dropped after the
failed call and made again for the next one: callers see the one error, never a dead pool.
"""

from __future__ import annotations

import inspect
import threading
from typing import Any, Callable, List, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

log = Logger()

T = TypeVar("T")


class IDatabaseRunner(Interface):
    """Runs functions of a database connection."""

    def run(fn: Callable[..., Any], *args: Any) -> Deferred:
        """C{fn(connection, *args)} on one of the runner's connections; a Deferred of its result."""

    def close() -> None:
        """Close every connection (waiting for calls under way); later calls fail."""


def _is_broken(connection: Any) -> bool:
    """Whether C{connection} cannot be used again (psycopg's C{broken}/C{closed}; sqlite3 never says)."""
    return bool(getattr(connection, "broken", False) or getattr(connection, "closed", False))


def _close_quietly(connection: Any) -> None:
    try:
        connection.close()
    except Exception:
        pass


@implementer(IDatabaseRunner)
class SynchronousRunner:
    """Each call at once, in the calling thread, on one connection (made lazily by C{connect})."""

    def __init__(self, connect: Callable[[], Any], connection: Any = None) -> None:
        self._connect = connect
        self._connection: Any = connection
        self._closed = False

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred:
        if self._closed:
            return fail(RuntimeError("the database runner is closed"))
        try:
            if self._connection is None:
                self._connection = self._connect()
            return succeed(fn(self._connection, *args))
        except BaseException:
            if self._connection is not None and _is_broken(self._connection):
                _close_quietly(self._connection)
                self._connection = None
            return fail()

    def close(self) -> None:
        self._closed = True
        if self._connection is not None:
            _close_quietly(self._connection)
            self._connection = None


@implementer(IDatabaseRunner)
class ThreadedRunner:
    """
    A pool of C{threads} threads, each with its own connection made by C{connect} at its first call;
    results come back through C{reactor.callFromThread}.  L{close} (the service's stop) waits for the
    calls under way and closes the connections.

    The threads start when the reactor runs (C{callWhenRunning}, as the reactor's own thread pool),
    never in the constructor: the service builds its stores in C{makeService}, before C{twistd}
    daemonizes, and a fork keeps only the forking thread.  A pool started before the fork has a worker
    thread that does not exist in the daemon: the first call handed to it never returns (an API
    request unanswered, a C{stopService} waiting for it forever).  Calls made before the reactor runs
    wait in the pool's queue until then.
    """

    def __init__(self, reactor: Any, connect: Callable[[], Any], threads: int = 4, name: str = "db") -> None:
        self._reactor = reactor
        self._connect = connect
        self._local = threading.local()
        self._connections: List[Any] = []
        self._lock = threading.Lock()
        self._pool = ThreadPool(minthreads=1, maxthreads=threads, name=f"tunnelkit-{name}")
        self._closed = False
        when_running = getattr(reactor, "callWhenRunning", None)
        if when_running is not None:
            when_running(self._start)
        else:
            self._start()
        # A safety net: its threads would keep the process alive if an owner forgot to close it.
        trigger = getattr(reactor, "addSystemEventTrigger", None)
        if trigger is not None:
            trigger("during", "shutdown", self.close)

    def _start(self) -> None:
        if not self._closed:
            self._pool.start()

    def _call(self, fn: Callable[..., Any], args: Any) -> Any:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._connect()
            with self._lock:
                self._connections.append(connection)
        try:
            return fn(connection, *args)
        except BaseException:
            if _is_broken(connection):
                self._local.connection = None
                with self._lock:
                    if connection in self._connections:
                        self._connections.remove(connection)
                _close_quietly(connection)
            raise

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred:
        if self._closed:
            return fail(RuntimeError("the database runner is closed"))
        return deferToThreadPool(self._reactor, self._pool, self._call, fn, args)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.stop()
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            _close_quietly(connection)


def resolved(d: Deferred) -> Any:
    """
    The result of C{d}, which has fired (a store on a L{SynchronousRunner}); raises its failure.
    For synchronous code over a store: the C{tunnelkit admin} commands and the service's start-up.
    """
    results: List[Any] = []
    d.addBoth(results.append)
    if not results:
        raise RuntimeError("resolved() needs a fired Deferred (a store on a SynchronousRunner)")
    result = results[0]
    from twisted.python.failure import Failure

    if isinstance(result, Failure):
        result.raiseException()
    return result


class Blocking:
    """
    A synchronous view of a store on a L{SynchronousRunner}: each method returns what the store's
    Deferred fired with (or raises its failure).  For the C{tunnelkit admin} commands, the service's
    start-up before the reactor runs, and tests that read a store directly.
    """

    def __init__(self, store: Any) -> None:
        self.store = store

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, name)
        if not inspect.ismethod(method):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            return resolved(result) if isinstance(result, Deferred) else result

        return call
