"""Reload (SIGHUP, `systemctl reload`): re-read the config file and apply it to the running front end.

What each changed option does is declared once, in the settings table (tcpha.config.settings,
reload = LIVE or RESTART): live options are applied in the arbiter (back ends in and out, health
damping and checks, dbglevel) and sent to every worker (``reload`` on its link, tcpha.fe.agent); a
restart-only option keeps its running value until the next restart or upgrade, with a warning. A
config file with an error is refused as a whole: the running configuration stays.

`Reload` is one of the parts FrontEndRuntime (tcpha.fe.runtime) is composed of.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from tcpha.config import ConfigError, load_fe_config
from tcpha.config.settings import reload_plan
from tcpha.fe.health import CheckTarget, HealthProber, HealthTable
from tcpha.loglevels import NOTICE, dbglevel_to_logging
from tcpha.runtime.plane import ControlPlane

if TYPE_CHECKING:
    from tcpha.fe.arbiter import FrontEnd     # for types only: the arbiter imports the runtime

log = logging.getLogger("tcpha.fe.runtime")


class Reload:
    """Applies a re-read config file. Uses the runtime's front end, config, health table and prober,
    plane, worker links (tcpha.fe.workerlinks) and control files (tcpha.fe.controlfiles)."""

    fe: FrontEnd
    config: Any
    health: HealthTable
    prober: HealthProber | None
    plane: ControlPlane
    dbglevel: int
    ask_all: Callable[..., Awaitable[list[dict]]]      # tcpha.fe.workerlinks.WorkerLinks
    add_backend_files: Callable[[str], None]           # tcpha.fe.controlfiles.ControlFiles
    remove_backend_files: Callable[[str], None]
    set_dtcinterval: Callable[[float], None]

    def reload(self) -> None:
        """Re-read the config file and apply it to the running front end (from any thread)."""
        self.plane.call_soon(lambda: asyncio.ensure_future(self._reload()))

    async def _reload(self) -> None:
        notify = self.fe.notify
        notify("RELOADING=1")
        try:
            try:
                new = await asyncio.get_running_loop().run_in_executor(None, load_fe_config, self.config.path)
            except ConfigError as e:
                log.error("reload refused, configuration unchanged: %s", e)
                return
            for line in new.warnings:
                log.warning("%s", line)
            # What each changed option does is declared once, in the settings table (reload = LIVE|RESTART).
            live, restart = reload_plan("fe", self.config, new)
            if not live and not restart:
                log.log(NOTICE, "reload: configuration unchanged")
                return
            if restart:
                log.warning("reload: %s changed; applied at the next restart (or upgrade)",
                            ", ".join(s.name for s in restart))
            changed = {s.attr for s in live}
            # Back ends: new servers in, removed ones out, weights as written.
            old_names = {s.name for s in self.config.servers}
            new_names = {s.name for s in new.servers}
            for spec in new.servers:
                be = self.health.add(spec.name, spec.weight)
                if spec.name not in old_names:
                    self.add_backend_files(spec.name)
                    if self.prober is not None:
                        self.prober.add(CheckTarget(spec.name, spec.kind, spec.host, spec.port, spec.path))
                be.dynamic = False
            for name in old_names - new_names:
                self.health.remove(name)
                self.remove_backend_files(name)
                if self.prober is not None:
                    self.prober.remove(name)
            self.health.set_damping(new.rise, new.fall)
            if "dtcinterval" in changed:
                self.set_dtcinterval(new.dtcinterval)
            if self.prober is not None:
                self.prober.timeout = new.healthtimeout
                self.prober.kind, self.prober.path = new.healthcheck, new.healthpath
                self.prober.app_port = new.healthport
                # New probe connections use the new key (established ones are already authenticated).
                self.prober.key = new.authkey
            keep = [s.attr for s in restart]
            for k in keep:
                setattr(new, k, getattr(self.config, k))
            self.config = new
            # what a worker forked with the old config and linked after the ask_all below is asked
            # (tcpha.fe.workerlinks._attach); set with the new config, before the ask
            self.reload_args = {"path": new.path, "keep": keep}
            self.fe.config = new                         # the registration port reads the key from here
            await self.ask_all("reload", path=new.path, keep=keep)
            await self.ask_all("gate", gate=self.health.available(), weights=self.health.weights())
            if "dbglevel" in changed:
                self.dbglevel = new.dbglevel
                logging.getLogger().setLevel(dbglevel_to_logging(self.dbglevel))
                await self.ask_all("dbglevel", level=self.dbglevel)
            if live:
                log.log(NOTICE, "reloaded %s: %s", new.path, ", ".join(s.name for s in live))
        except Exception:
            log.exception("reload failed")
        finally:
            notify("READY=1")

