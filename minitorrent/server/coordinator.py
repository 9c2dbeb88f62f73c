"""The leader key in etcd, through etcd's v3 JSON gateway, with the standard library only.

Why not a client library: the ``etcd3`` package does not import with today's
protobuf, and the gateway (plain HTTP + JSON, keys and values base64) does
all this needs. The calls, as etcd 3.4 answers them:

    POST /v3/lease/grant      {"TTL": 6}                      -> {"ID": "123", "TTL": "6"}
    POST /v3/lease/keepalive  {"ID": "123"}                   -> {"result": {"TTL": "6"}}  (no TTL: expired)
    POST /v3/kv/txn           {"compare": [key absent], "success": [put key under lease],
                               "failure": [range key]}         -> {"succeeded": true, "header": {"revision": "42"}}
    POST /v3/kv/range         {"key": k}                       -> {"kvs": [{"value", "create_revision", "lease"}]}
    POST /v3/kv/deleterange   {"key": k}

The leader key ``<prefix>/leader`` holds ``{"name", "address"}`` as JSON.
Whoever creates it (only if absent: a transaction) leads for as long as its
lease lives; the key's ``create_revision`` is the leader's **epoch**, a
cluster-wide, ever-growing fencing token (etcd's revision never goes back).
A leader whose lease renewal fails stops serving at once (``LeaseLost``);
etcd deletes the key when the lease expires and another member wins it.
"""
from __future__ import annotations

import base64
import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 4 << 20  # the largest answer read: the acknowledged-files range of ~40,000 files
MIN_TTL_S = 2  # etcd refuses (silently raises) shorter leases than about 1.5 s with its default timings
# We count a lease's TTL from when we *sent* its grant or renewal, so etcd's own count ends later; the margin
# covers what is left: our clock running slower than etcd's (NTP slews by at most 0.05 %) and the moment a
# reply takes to leave once the lease was checked. A tenth of the TTL is both with room to spare.
LEASE_SAFETY_FRACTION = 0.1


class EtcdUnavailable(Exception):
    """No configured etcd endpoint answered (or answered with an error)."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class EtcdGateway:
    """POSTs JSON to etcd's v3 gateway, trying each endpoint in turn, the last good one first. Thread-safe."""

    def __init__(self, endpoints: tuple[str, ...] | list[str], timeout_s: float) -> None:
        self.endpoints = [endpoint.rstrip("/") for endpoint in endpoints]
        self.timeout_s = timeout_s
        self._preferred = 0

    def call(self, path: str, body: dict) -> dict:
        """The decoded answer of the first endpoint that answers; ``EtcdUnavailable`` if none does."""
        errors = []
        count = len(self.endpoints)
        for step in range(count):
            index = (self._preferred + step) % count
            try:
                answer = self._post(self.endpoints[index] + path, body)
            except (OSError, ValueError) as error:  # URLError and timeouts are OSErrors; bad JSON a ValueError
                errors.append(f"{self.endpoints[index]}: {error}")
                continue
            self._preferred = index
            return answer
        raise EtcdUnavailable("; ".join(errors))

    def _post(self, url: str, body: dict) -> dict:
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            answer = json.loads(response.read(MAX_ANSWER_BYTES))
        if not isinstance(answer, dict):
            raise ValueError("etcd answered something other than a JSON object")  # caught as an unusable answer
        if "error" in answer and "header" not in answer:
            raise ValueError(f"etcd refused the request: {answer.get('error')}")
        return answer


@dataclass(frozen=True)
class Leader:
    """Who holds the leader key: member name, its address for clients and peers, and the epoch it won."""

    name: str
    address: str
    epoch: int
    lease: int


class LeaderElection:
    """One member's view of, and bid for, the leader key. Used by one thread at a time (the coordinator's)."""

    def __init__(self, gateway: EtcdGateway, prefix: str, name: str, address: str, ttl_s: float) -> None:
        self.gateway = gateway
        self.key = prefix.rstrip("/") + "/leader"
        self.name = name
        self.address = address
        self.ttl_s = max(MIN_TTL_S, int(-(-ttl_s // 1)))  # etcd leases are whole seconds: round up
        self._lease = 0
        self._lease_expires_at = 0.0  # monotonic; counted from when the grant or renewal was *sent*

    @property
    def lease_id(self) -> int:
        """Our current lease (0: none)."""
        return self._lease

    def lease_valid(self) -> bool:
        """True while our lease is certainly alive (before ``lease_deadline``)."""
        return time.monotonic() < self.lease_deadline()

    def lease_deadline(self) -> float:
        """Until when (``time.monotonic``) our lease is certainly alive: its TTL counted from the last grant
        or renewal we sent, less ``LEASE_SAFETY_FRACTION``; 0.0 without a lease."""
        if not self._lease:
            return 0.0
        return self._lease_expires_at - self.ttl_s * LEASE_SAFETY_FRACTION

    def renewal_due(self, interval_s: float) -> bool:
        """True once ``interval_s`` has passed since the lease was granted or last renewed."""
        return time.monotonic() >= self._lease_expires_at - self.ttl_s + interval_s

    def leader(self) -> Leader | None:
        """Who holds the key now (None: nobody); ``EtcdUnavailable`` if etcd cannot say."""
        answer = self.gateway.call("/v3/kv/range", {"key": _b64(self.key)})
        return self._leader_from(answer.get("kvs", []))

    def campaign(self) -> Leader | None:
        """Try to create the key under a fresh lease; the holder afterwards (us if we won), or None.

        ``EtcdUnavailable`` if etcd cannot be reached.
        """
        sent_at = time.monotonic()
        if not self.lease_valid():
            granted = self.gateway.call("/v3/lease/grant", {"TTL": self.ttl_s})
            self._lease, self._lease_expires_at = int(granted["ID"]), sent_at + int(granted.get("TTL", 0))
        value = _b64(json.dumps({"name": self.name, "address": self.address}))
        try:
            answer = self.gateway.call("/v3/kv/txn", {
                "compare": [{"key": _b64(self.key), "target": "CREATE", "create_revision": "0"}],
                "success": [{"request_put": {"key": _b64(self.key), "value": value, "lease": str(self._lease)}}],
                "failure": [{"request_range": {"key": _b64(self.key)}}]})
        except EtcdUnavailable:
            self._lease = 0  # perhaps etcd no longer knows it ("lease not found"): the next bid takes a new one
            raise
        if answer.get("succeeded"):
            return Leader(self.name, self.address, int(answer["header"]["revision"]), self._lease)
        ranges = answer.get("responses", [{}])[0].get("response_range", {})
        return self._leader_from(ranges.get("kvs", []))

    def renew(self) -> bool:
        """Renew our lease; False if it has expired (etcd forgot it). ``EtcdUnavailable`` if unreachable."""
        if not self._lease:
            return False
        sent_at = time.monotonic()
        answer = self.gateway.call("/v3/lease/keepalive", {"ID": str(self._lease)})
        ttl = int(answer.get("result", {}).get("TTL", 0))
        if ttl <= 0:
            self._lease = 0
            return False
        self._lease_expires_at = sent_at + ttl
        return True

    def resign(self) -> None:
        """Give the key up now (revoking the lease deletes it); best effort, for a clean stop."""
        lease, self._lease = self._lease, 0
        if lease:
            try:
                self.gateway.call("/v3/lease/revoke", {"ID": str(lease)})
            except EtcdUnavailable as error:
                log.warning("could not give up the leader key (it expires by itself): %s", error)

    def _leader_from(self, kvs: list) -> Leader | None:
        if not kvs:
            return None
        entry = kvs[0]
        try:
            value = json.loads(base64.b64decode(entry.get("value", "")))
            return Leader(str(value["name"]), str(value["address"]), int(entry["create_revision"]),
                          int(entry.get("lease", 0)))
        except (ValueError, KeyError, TypeError) as error:
            log.warning("the leader key holds something unreadable (%s): treated as held by nobody", error)
            return None


def _prefix_end(key: str) -> str:
    """The end of the key range holding every key that starts with ``key`` (etcd's range_end)."""
    raw = key.encode()
    return base64.b64encode(raw[:-1] + bytes([raw[-1] + 1])).decode()


class Acknowledgements:
    """The files acknowledged under ``cluster.ack: quorum``: ``<prefix>/acked/<sha256>`` -> name.

    A member that lacks one of them does not campaign, so the leader after a
    crash always holds every acknowledged file. The leader forgets a file's
    key when it stops sharing it (only while its own leader key still stands).
    """

    def __init__(self, gateway: EtcdGateway, prefix: str) -> None:
        self.gateway = gateway
        self.prefix = prefix.rstrip("/") + "/acked/"
        self.leader_key = prefix.rstrip("/") + "/leader"

    def add(self, sha256: str, name: str) -> None:
        """Record ``sha256`` as acknowledged. ``EtcdUnavailable`` if etcd cannot be reached."""
        self.gateway.call("/v3/kv/put", {"key": _b64(self.prefix + sha256), "value": _b64(name)})

    def all(self) -> dict[str, str]:
        """sha256 -> name of every acknowledged file. ``EtcdUnavailable`` if etcd cannot be reached."""
        answer = self.gateway.call("/v3/kv/range", {"key": _b64(self.prefix), "range_end": _prefix_end(self.prefix)})
        found = {}
        for entry in answer.get("kvs", []):
            key = base64.b64decode(entry["key"]).decode()
            found[key[len(self.prefix):]] = base64.b64decode(entry.get("value", "")).decode()
        return found

    def forget(self, sha256: str, leader_epoch: int) -> None:
        """Drop ``sha256``'s key if the leader key still has ``leader_epoch`` as its revision (a stale leader cannot)."""
        self.gateway.call("/v3/kv/txn", {
            "compare": [{"key": _b64(self.leader_key), "target": "CREATE", "create_revision": str(leader_epoch)}],
            "success": [{"request_delete_range": {"key": _b64(self.prefix + sha256)}}]})
