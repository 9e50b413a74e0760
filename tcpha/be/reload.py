"""SIGHUP on tcpha-be: re-read tcphabe.conf and apply what can change while connections run.

What a changed option does is declared once, by its ``reload`` in tcpha/config/settings.py (LIVE or
RESTART; docs/configuration.md shows it). How the live ones are applied, for new connections (connections
being relayed keep what they started with):

dbglevel, logfile                      the log level; the log file is reopened (stderr with ``-``)
redirectaddr, redirectport             where new handed-off (and same-host) connections are relayed; the new
                                       application port is announced to the front end: its health checker's
                                       control connections are closed so that they reconnect and read it
                                       from our Hello, and a dregister registration is sent again
rule, dregister, feaddr, feport,       rules sent again on the live registration (the front end replaces
registerretry                          them); a changed front end address or dregister on/off: Unregister
                                       from the old one, register with the new one
tlscert, tlskey, tlsports,             a new TLS context (certificate and key read again, e.g. renewed) and
sessioncache, sessiontimeout,          session cache connection for new TLS connections; sessionkeys read again
sessionkeys, sessioncachecafile,       (a rotation under the same path applies); the cache's TLS files read
sessioncachecert, sessioncachekey,     again
sessioncachecheckhost
maxclients, grace                      the new limits
=====================================  ========================================================================
=======
* dbglevel, logfile: the log level; the log file is reopened (stderr with ``-``);
* redirectaddr, redirectport: where new handed-off (and same-host) connections are relayed; the new
  application port is announced to the front end: its health checker's control connections are closed so
  that they reconnect and read it from our Hello, and a dregister registration is sent again;
* rule, dregister, feaddr, feport, registerretry: rules sent again on the live registration (the front end
  replaces them); a changed front end address or dregister on/off: Unregister from the old one, register
  with the new one;
* tlscert, tlskey, tlsports, sessioncache, sessiontimeout, sessionkeys: a new TLS context (certificate and
  key read again, e.g. renewed) and session cache connection for new TLS connections; the session key file
  is read again at every reload, so a rotation under the same path applies;
* maxclients, grace: read where they are used (a handoff, the stop).

The RESTART ones are kept as running and reported in one line.
A file with an error, a certificate that does not load or a log file that cannot be opened refuses the
whole reload in one line and changes nothing. sd_notify RELOADING=1 then READY=1, as tcpha-fe.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tcpha.be.registrar import start_registrar
from tcpha.be.tls import TlsSetupError, TlsTermination
from tcpha.config import ConfigError, load_be_config
from tcpha.config.settings import reload_plan
from tcpha.loglevels import NOTICE, dbglevel_to_logging
from tcpha.service import sd_notify, setup_logging

log = logging.getLogger("tcpha.be")

# How live changes are applied (which of them is live is the settings table's to say).
_TLS = ("tlscert", "tlskey", "tlsports", "sessioncache", "sessiontimeout", "sessionkeys", "sessioncachecafile",
        "sessioncachecert", "sessioncachekey", "sessioncachecheckhost")
_REGISTRATION = ("dregister", "feaddr", "feport")


def plan(old: Any, new: Any) -> tuple[list[str], list[str]]:
    """(applied live, needs a restart): the attributes of the changed options of two loaded configs, as
    the settings table declares them (tcpha.config.settings.reload_plan)."""
    live, restart = reload_plan("be", old, new)
    return [s.attr for s in live], [s.attr for s in restart]


class BackEndReloader:
    """One reload at a time; runs in the back end's event loop (SIGHUP handler)."""

    def __init__(self, be: Any, notify: Any = None):
        self.be = be
        self.notify = sd_notify if notify is None else notify
        self._running = False

    def on_sighup(self) -> None:
        if self._running:
            log.warning("SIGHUP: a reload is already running; ignored")
            return
        asyncio.ensure_future(self.reload())

    async def reload(self) -> bool:
        self._running = True
        self.notify("RELOADING=1")
        try:
            return await self._reload()
        except Exception:
            log.exception("reload failed")
            return False
        finally:
            self._running = False
            self.notify("READY=1")

    async def _reload(self) -> bool:
        be = self.be
        old = be.config
        loop = asyncio.get_running_loop()
        try:
            new = await loop.run_in_executor(None, load_be_config, old.path)
        except ConfigError as e:
            log.error("reload refused, configuration unchanged: %s", e)
            return False
        for line in new.warnings:
            log.warning("%s", line)
        live, restart = plan(old, new)
        if not live and not restart:
            log.log(NOTICE, "reload: configuration unchanged")
            return True
        for name in restart:                       # kept as running
            setattr(new, name, getattr(old, name))
        if "authkey" in restart:
            new.authkey_path = old.authkey_path
        # Everything that can fail is prepared first: a failure leaves the running configuration alone.
        tls = be.tls
        if any(c in live for c in _TLS):
            try:
                tls = await loop.run_in_executor(None, TlsTermination.from_config, new)
            except TlsSetupError as e:
                log.error("reload refused, configuration unchanged: %s", e)
                return False
        if "logfile" in live and new.logfile and new.logfile != "-":
            try:
                open(new.logfile, "a").close()
            except OSError as e:
                log.error("reload refused, configuration unchanged: logfile %s: %s", new.logfile, e.strerror or e)
                return False
        if restart:
            log.warning("reload: %s changed: needs a restart; the running value%s kept", ", ".join(restart),
                        "s are" if len(restart) > 1 else " is")
        self._apply(old, new, live, tls)
        if live:
            log.log(NOTICE, "reloaded %s: %s", new.path, ", ".join(live))
        return True

    def _apply(self, old: Any, new: Any, live: list[str], tls: Any) -> None:
        be = self.be
        be.config = new
        if "logfile" in live:
            setup_logging(new.dbglevel, new.logfile, "tcpha-be")
        if "dbglevel" in live or "logfile" in live:
            logging.getLogger().setLevel(dbglevel_to_logging(new.dbglevel))
            if be.runtime is not None:
                be.runtime.dbglevel = new.dbglevel
        be.maxclients = new.maxclients
        be.tls = tls
        app_moved = "redirectaddr" in live or "redirectport" in live
        if app_moved:
            be.app_addr = new.app_address
            log.log(NOTICE, "new connections are relayed to %s:%d", *be.app_addr)
            # The front end's health checker learnt the application port from our Hello on its control
            # connection: close those (they carry no handoffs) so that it reconnects and reads the new one.
            be.handoffs.close_health_sessions()
        self._registration(old, new, live)

    def _registration(self, old: Any, new: Any, live: list[str]) -> None:
        be = self.be
        registrar = be.registrar
        if any(c in live for c in _REGISTRATION):
            if registrar is not None:
                asyncio.ensure_future(registrar.stop())          # Unregister from the old front end
            be.registrar = start_registrar(be)
        elif registrar is not None and any(c in live for c in ("rules", "redirectport", "registerretry")):
            if registrar.update(new, app_port=be.app_addr[1]):
                log.log(NOTICE, "registration with %s sent again (%d rules, application port %d)",
                        registrar.fe_name, len(registrar.rules), be.app_addr[1])
