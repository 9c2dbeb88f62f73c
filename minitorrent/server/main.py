"""The main server's engine: serves the catalog, replicates to the backup, sends heartbeats.

It imports no tkinter: a window (or a test) holds one and calls its methods.
With ``server.secret`` set it replicates to the backup and sends it
heartbeats; see docs/failover.md for the roles and epochs.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from config_loader import Config
from database import PartialStore
from error_handler import MiniTorrentError
from minitorrent.server.catalog import AddResult
from minitorrent.server.engine import ServerEngine
from minitorrent.server.failback import (
    catch_up_and_take_over,
    remove_old_failback_staging,
)
from minitorrent.server.replication import (
    PEER_ERRORS,
    Heartbeater,
    PeerLink,
    Replicator,
    open_receiving_store,
)
from minitorrent.server.roles import Role, RoleChanged
from minitorrent.wire import protocol

log = logging.getLogger(__name__)


class MainServer(ServerEngine):
    """The main server's engine: catalog, role, replication and the request server.

    ``start``/``stop`` are called from one controlling thread; ``add_file``
    and ``remove_file`` from any thread (imports run in the caller's thread).
    """

    def __init__(self, config: Config) -> None:
        super().__init__(config, "main", config.server.main)
        backup = config.server.backup
        self.backup_address = (backup.host, backup.port)
        self.replicating = bool(config.server.secret) and backup.port != 0
        self.replicator: Replicator | None = None
        self._last_ack: tuple[float, protocol.HeartbeatAck] | None = None
        self._catch_up_thread: threading.Thread | None = None
        self._started_at = time.monotonic()

    # Files --------------------------------------------------------------------------

    def add_file(self, path: str | Path, on_progress: Callable[[int], None] | None = None) -> AddResult:
        """Import one file into the catalog; raises ``CatalogError`` on bad input."""
        result = self.catalog.add_file(path, on_progress)
        self._changed()
        return result

    def add_folder(self, path: str | Path,
                   on_progress: Callable[[int], None] | None = None) -> tuple[list[AddResult], list[str]]:
        """Import a whole folder tree (see ``Catalog.add_folder``): (results, warnings)."""
        try:
            return self.catalog.add_folder(path, on_progress)
        finally:
            self._changed()

    def remove_file(self, name: str) -> bool:
        """Stop sharing ``name``; True if it was shared."""
        removed = self.catalog.remove_file(name)
        self._changed()
        return removed

    def remove_path(self, path: str) -> int:
        """Stop sharing a file or a whole folder; how many files went (replicated to the backup)."""
        removed = self.catalog.remove_path(path)
        self._changed()
        return removed

    def rename_path(self, old: str, new: str) -> int:
        """Rename a file or a folder; how many names changed (replicated to the backup)."""
        renamed = self.catalog.rename_path(old, new)
        self._changed()
        return renamed

    def _changed(self) -> None:
        if self.replicator:
            self.replicator.notify_changed()

    # Running --------------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Start serving (and replicating); returns the bound (host, port).

        Raises ``MiniTorrentError`` if another main server runs on this data
        folder or the address cannot be bound.
        """
        address = self._listen()
        self._started_at = time.monotonic()
        remove_old_failback_staging(self.catalog.data_dir)
        if self.replicating:
            log.info("asking the backup who is active before serving (up to %g s)",
                     self.config.server.backup.heartbeat_timeout)
            self._start_replication(f"{address[0]}:{address[1]}")
        else:
            reason = "server.secret is empty" if not self.config.server.secret else "no backup configured"
            log.info("replication off: %s", reason)
            self.node.listeners.append(self._stay_active_alone)
            self.node.become_active(f"{reason}; serving alone")
        return address

    def _stop_workers(self) -> None:
        for thread in self._threads():
            thread.join(self.config.transfer.io_timeout + 1)

    def _stay_active_alone(self, event: RoleChanged) -> None:
        """With no backup there is no one to hand over to: a higher epoch from a client is taken and passed."""
        if event.role is Role.STANDBY and not self.stop_event.is_set():
            self.node.become_active("no backup to hand over to: taking an epoch above the one a client reported")

    def _threads(self) -> list[threading.Thread]:
        threads = [self._catch_up_thread] + ([self.replicator.thread, self._heartbeater.thread]
                                             if self.replicator else [])
        return [t for t in threads if t is not None and t.is_alive()]

    def _start_replication(self, my_address: str) -> None:
        secret, io_timeout = self.config.server.secret, self.config.transfer.io_timeout
        heartbeat_link = PeerLink(self.backup_address, secret, io_timeout, self.node)
        self.replicator = Replicator(self.catalog, PeerLink(self.backup_address, secret, io_timeout, self.node),
                                     self.config.transfer.pipeline_depth, self.stop_event)
        self._heartbeater = Heartbeater(heartbeat_link, self.config.server.backup.heartbeat_interval,
                                        self.catalog.db.catalog_version, my_address, self._on_heartbeat_ack,
                                        self.stop_event)
        self.replicator.start()
        self._heartbeater.start()

    # Roles -------------------------------------------------------------------------------

    def _on_heartbeat_ack(self, ack: protocol.HeartbeatAck | None) -> None:
        """Decide our role from the backup's answer (heartbeat thread)."""
        if ack is None:
            self._backup_unreachable()
            return
        self._last_ack = (time.monotonic(), ack)
        backup = f"{self.backup_address[0]}:{self.backup_address[1]}"
        backup_active = ack.role == Role.ACTIVE.value
        # It took over while we were away, or we lost our state; or it promoted itself to our own epoch
        # without ever hearing it (no heartbeat reached it before we went silent): a tie nothing else breaks.
        if ack.epoch > self.node.epoch or (backup_active and ack.epoch == self.node.epoch):
            self.node.observe_epoch(ack.epoch, "the backup", primary=backup if backup_active else "")
            if backup_active:
                self.node.step_down(f"the backup is also active, with epoch {ack.epoch}", backup)
            self._start_catch_up()
        elif self.node.role is Role.STANDBY and not self._catching_up():
            self.node.observe_epoch(ack.epoch, "the backup")
            self.node.become_active("the backup is on standby")

    def _backup_unreachable(self) -> None:
        if self.node.role is Role.ACTIVE or self._catching_up():
            return
        # Silence counts from our own start, as the backup's does: a backup that took over while we
        # were away and is briefly unreachable now must not find us serving a stale catalog beside it.
        last_contact = self._last_ack[0] if self._last_ack else self._started_at
        timeout = self.config.server.backup.heartbeat_timeout
        if time.monotonic() - last_contact > timeout:
            self.node.become_active("the backup is unreachable")

    def _catching_up(self) -> bool:
        return self._catch_up_thread is not None and self._catch_up_thread.is_alive()

    def _start_catch_up(self) -> None:
        if self._catching_up():
            return
        self._catch_up_thread = threading.Thread(target=self._catch_up_loop, name="failback", daemon=True)
        self._catch_up_thread.start()

    def _catch_up_loop(self) -> None:
        """Fetch what the backup gained and take the role back; retry until done or stopped."""
        config = self.config
        link = PeerLink(self.backup_address, config.server.secret, config.transfer.io_timeout, self.node)
        partials = open_receiving_store(self.catalog.data_dir / "failback.db", self.catalog)
        try:
            while not self.stop_event.is_set() and self.node.role is Role.STANDBY:
                if self._try_take_over(link, partials):
                    return
                self.stop_event.wait(config.server.backup.heartbeat_interval)
        finally:
            link.drop()
            partials.close()

    def _try_take_over(self, link: PeerLink, partials: PartialStore) -> bool:
        log.info("the backup knows epoch %d (ours is %d): catching up from it before serving",
                 self.node.highest_seen_epoch, self.node.epoch)
        try:
            handed_over = catch_up_and_take_over(self.catalog, link, partials, self.stop_event)
        except (*PEER_ERRORS, MiniTorrentError, OSError) as error:  # OSError: our disk; the part file is kept
            link.drop()
            log.warning("failback not done yet: %s", error)
            return False
        if handed_over:
            self.node.promote("the backup handed the active role back")
            self.metrics.set_downloads(self.catalog.download_counts())
            self._changed()
        return handed_over

    def backup_link(self) -> dict:
        """The backup link as status replies show it: replicating, address, role, epoch, lag (any thread)."""
        return self._status_extra()["backup"]

    def backup_holds(self) -> dict[str, str] | None:
        """name -> sha256 of what the backup holds, as the replicator last learnt; None if it does not know.

        Any thread. None while the replication link is down (the replicator
        asks for a fresh inventory on reconnection) or replication is off.
        """
        return self.replicator.backup_holds() if self.replicator else None

    def _status_extra(self) -> dict:
        if not self.replicating:
            return {"backup": {"replicating": False}}
        backup = {"replicating": True, "address": f"{self.backup_address[0]}:{self.backup_address[1]}"}
        if self._last_ack:
            seen_at, ack = self._last_ack
            backup.update(role=ack.role, epoch=ack.epoch, last_heartbeat_ack_age_s=round(time.monotonic() - seen_at, 3))
        if self.replicator:
            backup.update(self.replicator.status())
        return {"backup": backup}
