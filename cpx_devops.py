#!/usr/bin/env python3
"""cpx_devops: the health of a fleet on Cloud Provider X (CPX), in seconds.

One file, standard library only, Python 3.7 or newer: `cpx_devops.py --help` tells how to use it.
Each section uses only those above it (docs/design.md, "One file, in layers").
"""

import os
import signal
import sys

if sys.version_info < (3, 7):  # before any import 3.6 lacks: one line, not a traceback
    sys.stderr.write("cpx_devops: error: Python 3.7 or newer is needed; this is Python %d.%d\n"
                     % tuple(sys.version_info[:2]))
    sys.exit(2)


def _interrupted_at_start(signum: int, frame: object) -> None:
    """Ctrl+C while the tool starts: exit 130 at once, no traceback."""
    os._exit(130)


# Only as a program, over Python's usual handler (a background job keeps SIGINT ignored); main()
# puts that back. Limit: the interpreter's own start, before this line, is not covered.
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_at_start)

# Imports after that check and handler (E402 ignored): what --help needs; the rest where used.
import argparse
import contextlib
import functools
import re
import threading
import time
from types import MappingProxyType
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, NoReturn, Optional, Sequence, Set, Tuple

__version__ = "1.0.0"

EXIT_OK = 0
EXIT_FLAGGED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_PARTIAL = 4
EXIT_INTERNAL = 70  # EX_SOFTWARE in sysexits.h
EXIT_OUTPUT = 74  # EX_IOERR
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
EXIT_TERMINATED = 143

# The exit-status contract, written once: --help shows it, the README's table is checked against it.
EXIT_STATUSES = (
    (EXIT_OK, "success; for `unhealthy`, no service flagged"),
    (EXIT_FLAGGED, "`unhealthy` flagged at least one service (under its minimum, or expected and missing)"),
    (EXIT_USAGE, "usage error: a bad option or value, an unknown service or command, a URL that "
                 "cannot be requested, a `--write` FILE that cannot be written, a policy file that "
                 "cannot be read or is wrong, stdout closed without `--write`, an address `serve` or "
                 "`simulate` cannot listen on"),
    (EXIT_UNAVAILABLE, "CPX unavailable: the server list could not be read or lists no instance, no instance "
                       "could be read, or none of the service asked for while some could not be read"),
    (EXIT_PARTIAL, "`--strict` and some instance could not be read: the output was printed, from partial data"),
    (EXIT_INTERNAL, "an internal error, a bug in this tool: one line on stderr, to report"),
    (EXIT_OUTPUT, "the output could not be written: stdout or the `--write` FILE failed (a full disk, say)"),
    (EXIT_INTERRUPTED, "interrupted by Ctrl+C (`track` exits 0: Ctrl+C is how it stops)"),
    (EXIT_BROKEN_PIPE, "stdout closed early, as for any Unix tool killed by SIGPIPE (`| head`)"),
    (EXIT_TERMINATED, "terminated by SIGTERM (`serve` and `simulate`: their usual end, as Ctrl+C's 130)"),
)

DEFAULT_URL = "http://localhost:8080"
DEFAULT_TIMEOUT = 5.0
DEFAULT_DEADLINE = 60.0
DEFAULT_RETRIES = 2
DEFAULT_WORKERS = 64
DEFAULT_THRESHOLD = 90.0
DEFAULT_MIN_HEALTHY = 2
DEFAULT_INTERVAL = 2.0
DEFAULT_REDISCOVER = 60.0
MIN_INTERVAL = 0.1
# The longest duration an option takes: more is a typo (past threading.TIMEOUT_MAX, waits overflow).
MAX_SECONDS = 86400

SERVERS_BODY_CAP = 16 * 1024 * 1024
INSTANCE_BODY_CAP = 64 * 1024
POLICY_SIZE_CAP = 1024 * 1024  # a policy is written by hand: more is the wrong file
RETRYABLE_HTTP_STATUSES = frozenset({429, 502, 503, 504})
BACKOFF_BASE = 0.1
BACKOFF_CAP = 2.0
RETRY_AFTER_CAP = 10.0
MAX_SERVICE_NAME = 256
IPS_LISTED_PER_REASON = 5
SERVICE_CACHE = ("cpx_devops", "services")  # below the cache home: the names shell completion offers
SERVICE_CACHE_CAP = 256 * 1024

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
UNKNOWN = "Unknown"
GONE = "Gone"
_STATUS_RANK = {UNHEALTHY: 0, UNKNOWN: 1, HEALTHY: 2}  # worst first

SORT_KEYS = ("service", "ip", "status", "cpu", "memory")
SUMMARY_SORT_KEYS = ("service", "instances", "healthy", "cpu", "memory")
STATUS_FILTERS = ("healthy", "unhealthy", "unknown")
COLOR_MODES = ("auto", "always", "never")


class CpxUnavailable(Exception):
    """CPX cannot be used at all: main() prints one line and exits 3."""
    prefix = "CPX unavailable: "


class ServiceUnreadable(CpxUnavailable):
    """No readable instance has the service, but some could not be read (it may be among them): exit 3."""
    prefix = ""


class UsageError(Exception):
    """The user asked for something that cannot be done: exit 2."""


class OutputFailed(Exception):
    """The output could not be written (stdout, or the --write file): exit 74."""


class Terminated(BaseException):
    """Raised by the SIGTERM handler so that the command unwinds quietly."""


def program_name() -> str:
    """The name the tool was run by, for its messages: 'cpx-devops' installed, 'cpx_devops' copied."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return (name[:-3] if name.endswith(".py") else name) or "cpx_devops"


# Records and parsing of API values ----------------------------------------------------------------


class Instance(NamedTuple):
    """One instance as read: error says why it could not be; answered, whether it sent JSON at all."""
    ip: str
    service: Optional[str] = None
    cpu: Optional[float] = None
    memory: Optional[float] = None
    error: Optional[str] = None
    answered: bool = False

    @property
    def readable(self) -> bool:
        """Whether it could be read with valid data: the one test of Unknown."""
        return self.error is None and self.cpu is not None and self.memory is not None


class ServiceSummary(NamedTuple):
    """Per-service aggregate; service is None for the instances of unknown service."""
    service: Optional[str]
    instances: int
    healthy: int
    avg_cpu: Optional[float] = None
    avg_memory: Optional[float] = None
    max_cpu: Optional[float] = None
    max_memory: Optional[float] = None
    max_cpu_ip: Optional[str] = None  # the hottest instance (the lowest IP of a tie)
    max_memory_ip: Optional[str] = None


class Snapshot(NamedTuple):
    """One read of the whole fleet, how long it took, and when it started (ISO 8601, UTC)."""
    instances: List[Instance]
    seconds: float
    started: str = ""


class ServerList(NamedTuple):
    """The fleet as /servers listed it: valid IPs once each, and what was refused."""
    ips: List[str]
    rejected: List[Any]
    duplicates: int
    other_shards: int = 0  # listed, but read by another shard (--shard)


def parse_percent(value: Any) -> float:
    """Read "61%", "61", 61 or 61.5 as a percentage in 0-100; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("not a percentage")
    if isinstance(value, str):
        text = value.strip()
        text = text[:-1].rstrip() if text.endswith("%") else text
        if not re.match(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\Z", text):
            raise ValueError("not a percentage")
        value = float(text)
    if not 0 <= value <= 100:  # NaN fails too; a big int is compared before any float()
        raise ValueError("out of range")
    return float(value) + 0.0  # -0.0 becomes 0.0: never shown as "-0%"


def parse_instance(ip: str, payload: Any) -> Instance:
    """Turn one /<ip> answer into an Instance, with a short error when its data is invalid."""
    service = payload.get("service") if isinstance(payload, dict) else None
    if not isinstance(payload, dict):
        return Instance(ip, error="not a JSON object", answered=True)
    if "service" not in payload:
        return Instance(ip, error="missing service", answered=True)
    if not isinstance(service, str) or not service.strip() or len(service) > MAX_SERVICE_NAME:
        return Instance(ip, error="invalid service", answered=True)
    values = []
    for name in ("cpu", "memory"):
        try:
            values.append(parse_percent(payload[name]))
        except KeyError:
            return Instance(ip, service, error="missing " + name, answered=True)
        except ValueError:
            return Instance(ip, service, error="invalid " + name, answered=True)
    return Instance(ip, service, values[0], values[1], answered=True)


def address_key(entry: Any) -> Optional[Any]:
    """One key per IPv4/IPv6 address ('::1' and '0::1' share one), else None; '010.1.1.1' is refused."""
    if not isinstance(entry, str) or not re.match(r"[0-9A-Fa-f:.]{2,45}\Z", entry):
        return None
    if ":" not in entry:
        octet = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
        return entry if re.match(r"%s(?:\.%s){3}\Z" % (octet, octet), entry) else None
    import socket
    try:
        return socket.inet_pton(socket.AF_INET6, entry)
    except (OSError, ValueError):
        return None


def parse_server_list(payload: Any) -> ServerList:
    """A /servers list (else ValueError) checked: each spelling once; an address twice: kept as first."""
    if not isinstance(payload, list):
        raise ValueError("not a JSON list")
    spellings: Set[str] = set()
    addresses: Set[Any] = set()
    ips, rejected, duplicates = [], [], 0
    for entry in payload:
        if isinstance(entry, str):
            if entry in spellings:
                duplicates += 1
                continue
            spellings.add(entry)
        key = address_key(entry)
        if key is None:
            rejected.append(entry)
        elif key in addresses:
            duplicates += 1
        else:
            addresses.add(key)
            ips.append(entry)
    return ServerList(ips, rejected, duplicates)


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a Retry-After header (delta or HTTP date), or None."""
    value = (value or "").strip()
    if re.match(r"[0-9]{1,30}\Z", value):  # not str.isdigit(): it says yes to '²', which float() refuses
        return float(value)
    if not value or not value.isascii():  # an HTTP date is ASCII
        return None
    from email.utils import parsedate_to_datetime
    try:
        moment = parsedate_to_datetime(value)
        return max(0.0, moment.timestamp() - (time.time() if now is None else now))
    except (TypeError, ValueError, IndexError, AttributeError, OverflowError, OSError):
        return None  # not a date, or one no clock can reach (a year past 9999: found by fuzzing)


def shard_of(ip: str, count: int) -> int:
    """The shard (1 to count) of an instance: a SHA-256 of its canonical IP, the same on every machine."""
    import hashlib
    import ipaddress
    digest = hashlib.sha256(ipaddress.ip_address(ip).compressed.encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") % count + 1


class Shard(NamedTuple):
    """--shard K/N: this run reads only the instances of slice K (from 1) of N."""
    number: int
    of: int

    def holds(self, ip: str) -> bool:
        return shard_of(ip, self.of) == self.number

    def __str__(self) -> str:
        return "%d/%d" % self


# The policy: thresholds, minimums and expected services (--policy FILE) ---------------------------


class HealthyCount(NamedTuple):
    """A fixed minimum of healthy instances: '3'."""
    least: int

    def required(self, instances: int) -> int:
        return self.least

    def __str__(self) -> str:
        return str(self.least)


class HealthyShare(NamedTuple):
    """A share of the instances, rounded up as a PDB's minAvailable; a Fraction (floats make 7% of 100 8)."""
    percent: Any  # a fractions.Fraction, 0 to 100
    unit: str = "%"  # so that, as a tuple, it never equals HealthyCount(50)

    def required(self, instances: int) -> int:
        return -(-self.percent * instances // 100)  # the ceiling, exactly

    def __str__(self) -> str:
        return "%s%%" % (self.percent if self.percent.denominator == 1 else "%g" % float(self.percent))


class ExpectedService(NamedTuple):
    """A service a policy expects, and what it asks of it beyond the policy's defaults."""
    name: str
    min_healthy: Any = None  # a HealthyCount or HealthyShare, None for the policy's
    instances: Optional[int] = None  # how many it should have: a share's base, when above those seen
    cpu: Optional[float] = None
    memory: Optional[float] = None


class Policy(NamedTuple):
    """What the fleet should look like (--policy): the one place saying a service's thresholds and minimum."""
    cpu: float = DEFAULT_THRESHOLD
    memory: float = DEFAULT_THRESHOLD
    min_healthy: Any = HealthyCount(DEFAULT_MIN_HEALTHY)
    services: Any = MappingProxyType({})  # name -> ExpectedService, in the file's order
    source: Optional[str] = None  # the file it came from

    def limits(self, service: Optional[str]) -> Tuple[float, float]:
        """A service's cpu and memory thresholds: above either, its instances are Unhealthy."""
        own = self.services.get(service) or ExpectedService("")
        return (self.cpu if own.cpu is None else own.cpu), (self.memory if own.memory is None else own.memory)

    def min_healthy_for(self, service: Optional[str], instances: int) -> int:
        """Healthy instances needed; a share is of max(instances, the policy's count): the vanished count."""
        own = self.services.get(service) or ExpectedService("")
        return (own.min_healthy or self.min_healthy).required(max(instances, own.instances or 0))

    def overridden(self, cpu: Optional[float] = None, memory: Optional[float] = None,
                   min_healthy: Any = None) -> "Policy":
        """The policy with the command line's values, which beat the file's for every service."""
        given = dict(cpu=cpu, memory=memory, min_healthy=min_healthy)
        given = {key: value for key, value in given.items() if value is not None}
        services = {name: s._replace(**dict.fromkeys(given)) for name, s in self.services.items()}
        return self._replace(services=MappingProxyType(services), **given)


POLICY_KEYS = {"defaults": ("min_healthy", "cpu_threshold", "memory_threshold"),  # section kind -> its keys
               "service:": ("min_healthy", "instances", "cpu_threshold", "memory_threshold")}
LINE_ENDS = r"\r\n|\r|\n"  # LF, CRLF and a lone CR alike; a form feed is inside a line


def parse_min_healthy(text: str) -> Any:
    """'3' or '50%' as a HealthyCount or HealthyShare; ValueError saying what is wrong."""
    text = text.strip()
    if re.match(r"[0-9]{1,9}\Z", text):
        return HealthyCount(int(text))
    share = re.match(r"([0-9]{1,9}(?:\.[0-9]{1,20})?)\s*%\Z", text)
    if share:
        from fractions import Fraction
        if Fraction(share.group(1)) > 100:
            raise ValueError("%s is a percentage over 100" % text)
        return HealthyShare(Fraction(share.group(1)))
    if text.startswith("-"):
        raise ValueError("%s is negative: a count is 0 or more" % text)
    raise ValueError("%r is not a count (3) or a percentage of the instances (50%%)" % text)


def _policy_value(key: str, text: str) -> Any:
    if key == "min_healthy":
        return parse_min_healthy(text)
    if key == "instances":
        if text.startswith("-"):
            raise ValueError("%s is negative: a count is 1 or more" % text)
        if not re.match(r"[0-9]{1,9}\Z", text) or int(text) < 1:
            raise ValueError("%r is not a count of 1 or more" % text)
        return int(text)
    try:
        return parse_percent(text)
    except ValueError:
        raise ValueError("%r is not a percentage from 0 to 100" % text)


def parse_policy(text: str, source: str) -> Policy:
    """A policy's INI text ([defaults], [service:NAME]); UsageError naming file, line and fault. Read by
    hand: configparser keeps no line numbers, ignores a lone CR, and reads ']' per Python version."""
    def fail(line: int, message: str) -> NoReturn:
        raise UsageError("policy %s, line %d: %s" % (sanitize(source), line, sanitize(message)))

    sections: Dict[str, Tuple[int, Dict[str, Tuple[str, int]]]] = {}  # name -> (line, key -> (value, line))
    keys: Optional[Dict[str, Tuple[str, int]]] = None
    for number, line in enumerate(re.split(LINE_ENDS, text), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if stripped[0] == "[":
            end = re.search(r"\]\s*(?:[#;]|\Z)", stripped)  # the first ']' that only a comment follows
            if end is None:
                fail(number, "a [section] line ends with its ']', then a comment at most: %s" % stripped[:80])
            section = stripped[1:end.start()]
            if section in sections:
                fail(number, "[%s] is there twice" % section)
            keys = {}
            sections[section] = (number, keys)
            continue
        pair = re.match(r"([^=:]*)[=:](.*)", stripped, re.DOTALL)  # key = value, or key: value
        if keys is None:
            fail(number, "a key before any [section]: %s" % stripped[:80])
        if pair is None:
            fail(number, "not a [section], a key = value, or a comment: %s" % stripped[:80])
        key = pair.group(1).strip().lower()
        if key in keys:
            fail(number, "%s in [%s] is there twice" % (key, list(sections)[-1]))
        keys[key] = (re.split(r"(?:\A|\s)[#;]", pair.group(2), maxsplit=1)[0].strip(), number)  # less a comment
    read: Dict[str, Dict[str, Any]] = {}  # section -> key -> value
    for section, (line, keys) in sections.items():
        kind = "service:" if section.startswith("service:") else section
        if kind not in POLICY_KEYS:
            fail(line, "unknown section [%s]%s; a policy has [defaults] and [service:NAME] sections"
                 % (section, _suggestion(section.lower(), list(POLICY_KEYS), 0.5)))
        name = section[len(kind):].strip()
        if kind == "service:" and not name:
            fail(line, "[%s] names no service" % section)
        if kind == "service:" and re.search(r"[*?[]", name):
            fail(line, "[%s] names one service, not a pattern: * ? and [ are not taken" % section)
        if kind == "service:" and "service:" + name in read:
            fail(line, "service %s is there twice" % name)
        values = read["service:" + name if name else kind] = {}
        for key, (value, key_line) in keys.items():
            if key not in POLICY_KEYS[kind]:
                fail(key_line, "unknown key %r in [%s]%s; it takes %s" % (key, section, _suggestion(
                    key, POLICY_KEYS[kind]), ", ".join(POLICY_KEYS[kind])))
            try:
                values[key.replace("_threshold", "")] = _policy_value(key, value)  # a field's name
            except ValueError as error:
                fail(key_line, "%s: %s" % (key, error))
    defaults = read.pop("defaults", {})
    for section, (_, keys) in sections.items():  # a minimum that more instances than expected could meet
        values = read.get(section, {})
        minimum = values.get("min_healthy", defaults.get("min_healthy", Policy().min_healthy))
        if isinstance(minimum, HealthyCount) and values.get("instances", minimum.least) < minimum.least:
            if "min_healthy" in values:
                fail(keys["min_healthy"][1], "min_healthy %d is more than its %d instances: it could "
                     "never be met" % (minimum.least, values["instances"]))
            fail(keys["instances"][1], "instances %d is fewer than the default min_healthy of %d: it "
                 "could never be met; give [%s] a min_healthy of its own" % (values["instances"], minimum.least,
                                                                            section))
    services = {s.name: s for s in (ExpectedService(name[len("service:"):], **v) for name, v in read.items())}
    return Policy(**defaults, services=MappingProxyType(services), source=source)


def read_policy(path: str, source: str) -> Policy:
    """The policy in a regular file, opened without blocking (a FIFO is refused); UsageError if bad."""
    if not path:
        raise UsageError("%s is empty: name a policy file" % source)
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        kind = file_kind(os.fstat(descriptor).st_mode)
        if kind:
            os.close(descriptor)
            raise UsageError("cannot read policy %s: it is %s, not a regular file" % (sanitize(path), kind))
        with os.fdopen(descriptor, "rb") as stream:
            data = stream.read(POLICY_SIZE_CAP + 1)
    except OSError as error:
        raise UsageError("cannot read policy %s: %s" % (sanitize(path), error.strerror or error))
    if len(data) > POLICY_SIZE_CAP:
        raise UsageError("policy %s: over %s, the wrong file?" % (sanitize(path), _size(POLICY_SIZE_CAP)))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = len(re.split(LINE_ENDS, data[:error.start].decode("ascii", "replace")))
        raise UsageError("policy %s, line %d: not UTF-8 text" % (sanitize(path), line))
    return parse_policy(text, path)


def file_kind(mode: int) -> Optional[str]:
    """What a file of this mode is when it is not a regular file ("a FIFO or pipe"...), else None."""
    import stat
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO or pipe"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISLNK, "a symbolic link"))
    return next((kind for is_kind, kind in kinds if is_kind(mode)), None)


class Options(NamedTuple):
    """Everything a command needs to know, built once from the arguments."""
    url: str = DEFAULT_URL
    timeout: float = DEFAULT_TIMEOUT
    deadline: Optional[float] = None  # --deadline; None for the command's default
    retries: int = DEFAULT_RETRIES
    workers: int = DEFAULT_WORKERS
    adaptive: bool = True
    output: str = "table"
    quiet: bool = False
    verbose: bool = False
    color: bool = False
    interactive: bool = False
    headers: bool = True
    write: Optional[str] = None
    service_cache: Optional[str] = None  # where the services seen go, for shell completion
    policy: Policy = Policy()  # thresholds, minimums, expected services
    shard: Optional[Shard] = None
    authorization: Optional[str] = None  # from credentials in the URL: never shown

    def __repr__(self) -> str:
        shown = (pair for pair in zip(self._fields, self) if pair[0] != "authorization")
        return "Options(%s)" % ", ".join("%s=%r" % pair for pair in shown)


# Pure analysis: health rule, aggregation, flagging, sorting, choosing services --------------------


def instance_status(instance: Instance, policy: Policy) -> str:
    """Healthy, Unhealthy (cpu or memory strictly above its service's threshold) or Unknown."""
    return UNKNOWN if not instance.readable else UNHEALTHY if instance_reasons(instance, policy) else HEALTHY


def instance_reasons(instance: Instance, policy: Policy) -> List[str]:
    """Why an instance is Unhealthy: the resources over their thresholds ([] when it is not)."""
    if not instance.readable:
        return []
    cpu, memory = policy.limits(instance.service)
    over = (("cpu", instance.cpu or 0.0, cpu), ("memory", instance.memory or 0.0, memory))
    return [name for name, value, limit in over if value > limit]


def _plural(count: int, noun: str, nouns: Optional[str] = None) -> str:
    return "%d %s" % (count, noun if count == 1 else nouns or noun + "s")


def _suggestion(word: str, choices: Sequence[str], cutoff: float = 0.6) -> str:
    """"; did you mean 'x'?" for the closest of choices, or nothing."""
    import difflib
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return "; did you mean %r?" % sanitize(close[0]) if close else ""


def service_sort_key(service: Optional[str]) -> Tuple[int, str, str]:
    """Services by name, case-insensitively; the unknown group last."""
    return (1, "", "") if service is None else (0, service.lower(), service)


def ip_sort_key(ip: str) -> Tuple[int, int, str]:
    """Numeric order: 10.58.1.9 before 10.58.1.10, IPv4 before IPv6."""
    import ipaddress
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return (9, 0, ip)
    return (address.version, int(address), ip)


def summarize_services(instances: Iterable[Instance], policy: Policy) -> List[ServiceSummary]:
    """One summary per service, by name; averages and maxima over the instances that could be read."""
    groups: Dict[Optional[str], List[Instance]] = {}
    for instance in instances:
        groups.setdefault(instance.service, []).append(instance)
    summaries = []
    for service in sorted(groups, key=service_sort_key):
        members = groups[service]
        readable = sorted((m for m in members if m.readable), key=lambda m: ip_sort_key(m.ip))
        # max() keeps the first of equals: the lowest IP is the hottest of a tie.
        hottest_cpu = max(readable, key=lambda m: m.cpu or 0.0, default=None)
        hottest_memory = max(readable, key=lambda m: m.memory or 0.0, default=None)
        summaries.append(ServiceSummary(
            service, len(members), sum(1 for m in members if instance_status(m, policy) == HEALTHY),
            sum(m.cpu or 0.0 for m in readable) / len(readable) if readable else None,
            sum(m.memory or 0.0 for m in readable) / len(readable) if readable else None,
            hottest_cpu.cpu if hottest_cpu else None, hottest_memory.memory if hottest_memory else None,
            hottest_cpu.ip if hottest_cpu else None, hottest_memory.ip if hottest_memory else None))
    return summaries


def fleet_summaries(instances: Iterable[Instance], policy: Policy,
                    chosen: Optional[Set[str]] = None) -> List[ServiceSummary]:
    """A summary per service seen, and a 0-instance row per (chosen) expected service with none."""
    summaries = summarize_services(instances, policy)
    present = {s.service for s in summaries}
    missing = [ServiceSummary(name, 0, 0) for name in policy.services
               if name not in present and (chosen is None or name in chosen)]
    return sorted(summaries + missing, key=lambda s: service_sort_key(s.service)) if missing else summaries


def flag_services(summaries: Iterable[ServiceSummary], policy: Policy) -> List[ServiceSummary]:
    """Services under their minimum, and expected ones missing; worst first, missing first of equals."""
    flagged = [s for s in summaries if not s.instances
               or s.healthy < policy.min_healthy_for(s.service, s.instances)]
    return sorted(flagged, key=lambda s: (s.healthy, s.instances > 0, service_sort_key(s.service)))


def flag_problem(summary: ServiceSummary) -> str:
    """Why unhealthy flags a service, in a word or two."""
    return "missing" if not summary.instances else "unreadable" if summary.service is None else "below minimum"


def filter_statuses(instances: Iterable[Instance], statuses: Sequence[str], policy: Policy) -> List[Instance]:
    """The instances whose status is one of statuses (lower case); all of them when none is given."""
    return [i for i in instances if not statuses or instance_status(i, policy).lower() in statuses]


def sort_instances(instances: Iterable[Instance], key: str, policy: Policy) -> List[Instance]:
    """Instances in the order of --sort's key (worst or highest first); ties by service, then IP."""
    def by_service(instance: Instance) -> Tuple:
        return (service_sort_key(instance.service), ip_sort_key(instance.ip))

    if key == "ip":
        return sorted(instances, key=lambda i: ip_sort_key(i.ip))
    if key == "status":
        return sorted(instances, key=lambda i: (_STATUS_RANK[instance_status(i, policy)],) + by_service(i))
    if key in ("cpu", "memory"):
        return sorted(instances, key=lambda i: (getattr(i, key) is None, -(getattr(i, key) or 0), *by_service(i)))
    return sorted(instances, key=by_service)


def sort_summaries(summaries: Iterable[ServiceSummary], key: str) -> List[ServiceSummary]:
    """Service rows in the order of --sort's key (see its help); ties by name."""
    def by_key(summary: ServiceSummary) -> Tuple:
        if key in ("cpu", "memory"):
            value = getattr(summary, "avg_" + key)
            return (value is None, -(value or 0.0))
        return {"instances": (-summary.instances,), "healthy": (summary.healthy,)}.get(key, ())

    return sorted(summaries, key=lambda s: by_key(s) + service_sort_key(s.service))


def resolve_service(name: str, known: Iterable[str], unreadable: int = 0) -> str:
    """The service name means (exact, else the only one in any case); else ServiceUnreadable or UsageError."""
    import difflib
    known = sorted(set(known), key=lambda name: (name.lower(), name))
    if name in known:
        return name
    folded = [service for service in known if service.lower() == name.lower()]
    if len(folded) == 1:
        return folded[0]
    if folded:
        raise UsageError("%r could be any of %s: give the name in its own case" % (
            sanitize(name), ", ".join(repr(sanitize(service)) for service in folded)))
    # Suggested among names of up to 64 characters: difflib costs the product of the two lengths.
    alike = [service for service in known if len(service) <= 64] if len(name) <= 64 else []
    lowered = {service.lower(): service for service in alike}
    close = difflib.get_close_matches(name, alike, n=1, cutoff=0.5) or [
        lowered[m] for m in difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.5)]
    if unreadable:
        raise ServiceUnreadable("no readable instance of %r; %s could not be read, it may be among them%s" % (
            sanitize(name), _plural(unreadable, "instance"), _suggestion(close[0], close) if close else ""))
    hint = " (did you mean %r?)" % sanitize(close[0]) if close else ""
    names = "known services: " + ", ".join(map(sanitize, known)) if known else "CPX lists no readable service"
    raise UsageError("unknown service %r%s; %s" % (sanitize(name), hint, names))


def _glob_class(body: str) -> str:
    negate = body[:1] == "!"
    body, items, k = body[negate:], [], 0
    while k < len(body):
        if body[k + 1:k + 2] == "-" and k + 2 < len(body):
            if body[k] <= body[k + 2]:
                items.append("%s-%s" % (re.escape(body[k]), re.escape(body[k + 2])))
            k += 3
        else:
            items.append(re.escape(body[k]))
            k += 1
    if not items:
        return "." if negate else "(?!)"
    return "[%s%s]" % ("^" if negate else "", "".join(items))


@functools.lru_cache(maxsize=64)
def glob_parts(pattern: str) -> List[Tuple[Any, int]]:
    """A pattern's '*'-separated parts as (regex, length): none backtracks, as fnmatch's do ('*a*a*a*a*b')."""
    parts: List[Tuple[Any, int]] = []
    regex, length, k = "", 0, 0
    while k < len(pattern):
        char, k = pattern[k], k + 1
        end = -1
        if char == "[":
            start = k + (pattern[k:k + 1] == "!")
            end = pattern.find("]", start + (pattern[start:start + 1] == "]"))
        if char == "*":
            parts.append((re.compile(regex, re.DOTALL), length))
            regex, length = "", 0
            continue
        if char == "?":
            regex += "."
        elif end >= 0:
            regex, k = regex + _glob_class(pattern[k:end]), end + 1
        else:
            regex += re.escape(char)
        length += 1
    return parts + [(re.compile(regex, re.DOTALL), length)]


def glob_match(name: str, pattern: str) -> bool:
    """Whether name matches the pattern, in linear time: each middle part at its leftmost place."""
    parts = glob_parts(pattern)
    (first, first_length), (last, last_length) = parts[0], parts[-1]
    if len(parts) == 1:
        return first.fullmatch(name) is not None
    if first.match(name) is None:
        return False
    position = first_length
    for regex, _ in parts[1:-1]:
        found = regex.search(name, position)
        if found is None:
            return False
        position = found.end()
    start = len(name) - last_length
    return start >= position and last.fullmatch(name, start) is not None


def resolve_services(patterns: Sequence[str], known: Iterable[str], unreadable: int = 0) -> List[str]:
    """The services names and patterns ('Pay*') mean, in order, each once (see resolve_service)."""
    known = sorted(set(known), key=lambda name: (name.lower(), name))
    chosen: List[str] = []
    for pattern in patterns:
        matched: List[str] = []
        if re.search(r"[*?[]", pattern):
            matched = [s for s in known if glob_match(s, pattern)] or [
                s for s in known if glob_match(s.lower(), pattern.lower())]
        if not matched:
            matched = [resolve_service(pattern, known, unreadable)]
        chosen += [service for service in matched if service not in chosen]
    return chosen


def summarize_failures(instances: Sequence[Instance]) -> Optional[str]:
    """One line grouping unreadable instances by reason, or None when all were read."""
    failed = [i for i in instances if not i.readable]
    if not failed:
        return None
    by_reason: Dict[str, List[str]] = {}
    for instance in failed:
        by_reason.setdefault(instance.error or "no value", []).append(instance.ip)
    parts = ["%s %s" % (reason, _listed(sorted(ips, key=ip_sort_key)[:IPS_LISTED_PER_REASON], len(ips)))
             for reason, ips in sorted(by_reason.items(), key=lambda item: (-len(item[1]), item[0]))]
    return "%d of %s could not be read: %s" % (len(failed), _plural(len(instances), "instance"), "; ".join(parts))


def _listed(shown: Sequence[str], total: int) -> str:
    return ", ".join(shown) + (" and %d more" % (total - len(shown)) if total > len(shown) else "")


# The CPX client: one opener, timeouts, retries, concurrency control -------------------------------


class FetchError(Exception):
    """A failed request: a short reason (failures group by it), and pushback for the limiter, or None."""
    def __init__(self, reason: str, retryable: bool = False, retry_after: Optional[float] = None,
                 detail: str = "", pushback: Optional[str] = None):
        super().__init__(reason)
        self.reason, self.retryable, self.retry_after, self.detail, self.pushback = (
            reason, retryable, retry_after, detail, pushback)


def _redacted(url: str) -> str:
    """A URL fit for a message: all before its last '@' (even when unparsable) shown as ***."""
    if "@" not in url:
        return url
    before, _, after = url.rpartition("@")
    scheme = re.match(r"[A-Za-z][A-Za-z0-9+.-]*:[/\\]*", before)
    return (scheme.group() if scheme else "") + "***@" + after


def parse_base_url(text: str, source: str = "--url") -> Tuple[str, Optional[str]]:
    """A checked base URL (no trailing slash, no credentials), and the credentials' Authorization or None."""
    from urllib.parse import unquote, urlsplit
    text = text.strip()

    def refuse(why: str) -> NoReturn:
        raise UsageError("URL %r (from %s) %s" % (sanitize(_redacted(text)), source, why))

    if not text:
        refuse("is empty")
    bad = re.search(r"[\x00-\x20\x7f\\]", text)
    if bad:
        what = {" ": "a space", "\\": "a backslash"}.get(bad.group(), "a control character")
        refuse("contains %s (percent-encode it)" % what)
    try:
        parts = urlsplit(text)
        port = parts.port  # ValueError on a port that is not a number in range
    except ValueError:
        refuse("is not a valid URL (a port must be a number from 0 to 65535)")
    if parts.scheme not in ("http", "https"):
        refuse("must start with http:// or https://")
    if not parts.hostname:
        refuse("has no host")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        refuse("must not have a query or fragment")
    if not parts.path.isascii():
        refuse("has a character that is not ASCII in its path (percent-encode it)")
    host = parts.hostname
    try:
        host = "[%s]" % host if ":" in host else host.encode("idna").decode("ascii")
    except UnicodeError:
        refuse("has a host name that cannot be looked up (a label empty or over 63 characters?)")
    authorization = None
    if parts.username is not None or parts.password is not None:
        import base64
        pair = "%s:%s" % (unquote(parts.username or ""), unquote(parts.password or ""))
        authorization = "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")
    netloc = host if port is None else "%s:%d" % (host, port)
    return "%s://%s%s" % (parts.scheme, netloc, parts.path.rstrip("/")), authorization


class RequestGuard:
    """One request's time limit, and the connection to cut when it passes."""
    def __init__(self, give_up_at: float):
        self.give_up_at = give_up_at
        self.lock = threading.Lock()
        self.sock: Any = None
        self.fired = False
        self.connect_seconds: Optional[float] = None  # None: never connected

    def connected(self, sock: Any, seconds: float) -> None:
        """The request's connection is open (after `seconds`); cut it at once if time is up."""
        with self.lock:
            self.sock, self.connect_seconds = sock, seconds
            if self.fired:
                self._cut()

    def fire(self) -> None:
        """Time is up: cut the connection, so that any read in progress returns now."""
        with self.lock:
            self.fired = True
            self._cut()

    def _cut(self) -> None:
        import socket
        if self.sock is not None:
            with contextlib.suppress(OSError):  # already closed: nothing left to cut
                # The socket level, not ssl's: shutdown wakes a thread blocked in recv.
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)


class Watchdog:
    """One thread that cuts requests past their time limit, however the server trickles (a socket
    timeout bounds a read, not a request). Limit: TLS handshakes and DNS get the socket timeout only."""
    SLACK = 0.01  # seconds: limits this close together are handled in one wake-up

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.armed: Set[RequestGuard] = set()
        self.wake_at = float("inf")
        self.thread: Optional[threading.Thread] = None
        self.closing = False
        self.local = threading.local()  # the guard of the request this thread is making

    def arm(self, give_up_at: float) -> RequestGuard:
        """Guard the calling thread's next request until give_up_at."""
        guard = self.local.guard = RequestGuard(give_up_at)
        with self.condition:
            self.armed.add(guard)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="cpx-watchdog", daemon=True)
                self.thread.start()
            elif give_up_at < self.wake_at:
                self.condition.notify()
        return guard

    def disarm(self, guard: RequestGuard) -> None:
        """The request is over: stop guarding it."""
        self.local.guard = None
        with self.condition:
            self.armed.discard(guard)

    def close(self) -> None:
        """Stop the thread once the requests it guards are over (or cut)."""
        with self.condition:
            self.closing = True
            self.condition.notify()

    def _run(self) -> None:
        with self.condition:
            while True:
                now = time.monotonic()
                for guard in [g for g in self.armed if g.give_up_at <= now]:
                    self.armed.discard(guard)
                    guard.fire()
                earliest = min((g.give_up_at for g in self.armed), default=None)
                if earliest is None and self.closing:
                    self.thread = None
                    return
                self.wake_at = float("inf") if earliest is None else max(earliest, now + self.SLACK)
                self.condition.wait(None if earliest is None else self.wake_at - now)


def _origin(url: str, base: str = "") -> Tuple[str, Optional[str], Optional[int]]:
    """(scheme, host, port) of url read against base; a URL that cannot be read is nobody's origin."""
    from urllib.parse import urljoin, urlsplit
    try:
        parts = urlsplit(urljoin(base, url))
        scheme = parts.scheme.lower()
        return scheme, parts.hostname, parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:  # a port that is not a number, an IPv6 address with no closing ]
        return "", None, -1


def _build_opener(watchdog: Watchdog, scheme: str) -> Any:
    """One urllib opener for one scheme, same-origin redirects, each connection given to the watchdog."""
    import urllib.request
    @functools.lru_cache(maxsize=None)  # a class each, made once
    def guarded(connection_class: Any) -> Any:
        class Guarded(connection_class):  # type: ignore[misc,valid-type]
            def connect(self) -> None:
                began = time.monotonic()
                super().connect()
                guard = getattr(watchdog.local, "guard", None)  # this thread's request's
                if guard is not None:
                    guard.connected(self.sock, time.monotonic() - began)
        return Guarded

    class GuardedConnections:
        # urllib has no public hook for the connection class: do_open is where ours takes its place.
        def do_open(self, http_class: Any, req: Any, **http_conn_args: Any) -> Any:
            return super().do_open(guarded(http_class), req, **http_conn_args)  # type: ignore[misc]

    class SameOriginRedirects(urllib.request.HTTPRedirectHandler):
        """Redirects to the same scheme, host and port only: Authorization goes nowhere else."""
        def http_error_302(self, req: Any, fp: Any, code: int, msg: str, headers: Any) -> Any:
            location = headers.get("Location") or headers.get("URI")
            if location and _origin(location, req.full_url) != _origin(req.full_url):
                fp.close()
                raise FetchError("redirected to %s, not followed" % sanitize(_redacted(location))[:200])
            return super().http_error_302(req, fp, code, msg, headers)

        http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    # By hand, not build_opener(): no file:, ftp: or data: handler. Only the base URL's scheme (redirects keep
    # to it) and its proxy's: 3.12+ loads the CA certificates for an https handler, 18 ms of each http run.
    wanted = {scheme, urllib.request.getproxies().get(scheme, "").partition(":")[0].lower()}
    opener = urllib.request.OpenerDirector()
    handlers = [urllib.request.ProxyHandler(), urllib.request.UnknownHandler(),
                urllib.request.HTTPDefaultErrorHandler(), SameOriginRedirects(), urllib.request.HTTPErrorProcessor()]
    handlers += [type("Guarded", (GuardedConnections, getattr(urllib.request, name)), {})()
                 for name in ("HTTPHandler", "HTTPSHandler")
                 if name[:-7].lower() in wanted and hasattr(urllib.request, name)]
    for handler in handlers:
        opener.add_handler(handler)
    return opener


def _read_capped(response: Any, cap: int) -> bytes:
    length = response.headers.get("Content-Length")
    if length and re.match(r"\s*[0-9]{1,30}\s*\Z", length) and int(length) > cap:  # not isdigit(): '²'
        raise FetchError("answer over %s" % _size(cap))
    chunks: List[bytes] = []
    total = 0
    while True:
        chunk = response.read1(65536)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > cap:
            raise FetchError("answer over %s" % _size(cap))
        chunks.append(chunk)


def _size(byte_count: int) -> str:
    return "%d MiB" % (byte_count >> 20) if byte_count >= 1 << 20 else "%d KiB" % (byte_count >> 10)


def _describe_network_error(error: BaseException) -> FetchError:
    import http.client
    import socket
    reason = getattr(error, "reason", error)
    if isinstance(reason, socket.timeout) or isinstance(error, socket.timeout):
        return FetchError("timeout", retryable=True)
    if isinstance(reason, ConnectionRefusedError):
        return FetchError("connection refused", retryable=True)
    if isinstance(reason, socket.gaierror):
        return FetchError("cannot resolve host (%s)" % sanitize(str(reason.args[-1]))[:80])
    if isinstance(reason, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError,
                           http.client.RemoteDisconnected, http.client.IncompleteRead)):
        return FetchError("connection reset", retryable=True)
    if isinstance(reason, http.client.HTTPException):
        return FetchError("bad HTTP answer", retryable=True)
    text = sanitize(str(reason) or reason.__class__.__name__)[:80]
    return FetchError(text, retryable=isinstance(reason, OSError))


def backoff_delay(attempt: int, retry_after: Optional[float] = None, rng: Any = None) -> float:
    """Seconds before retry number attempt+1: Retry-After (capped) if given, else jittered exponential."""
    if retry_after is not None:
        return min(retry_after, RETRY_AFTER_CAP)
    import random
    # Full jitter: clients that failed together do not retry together.
    return (rng or random).uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt))


class ConcurrencyLimit:
    """Requests in flight, fixed at `limit` (--concurrency fixed). Told the time (`now`), so tests replay
    any sequence; start(), finish(), room() for the dispatching thread, observe() for the workers."""
    # What one attempt came to, as observe() is told.
    ANSWERED = "answered"  # a valid answer: its latency is a sample
    REFUSED = "refused"  # HTTP 429: the server asks for fewer requests
    DROPPED = "dropped"  # the connection timed out: a listen queue that drops SYNs
    FAILED = "failed"  # anything else (an error answer, a timeout, the deadline): not a sample

    def __init__(self, limit: int):
        self.lock = threading.Lock()
        self.limit = limit
        self.peak = limit
        self.running: Dict[int, float] = {}  # ticket -> start, oldest first; these count
        self.stuck: Set[int] = set()  # still running, no longer counted
        self.congested = False  # while the server queues, stuck requests count again
        self.tickets = 0

    @property
    def capacity(self) -> int:
        """The most requests in flight at once, stuck ones included (the thread pool's size)."""
        return self.limit

    def stuck_after(self) -> float:
        """Seconds after which a running request stops counting against the limit."""
        return float("inf")

    def begin_batch(self) -> None:
        """A batch of reads starts (on a server idle since the last one)."""

    def observe(self, ticket: int, outcome: str, latency: float = 0.0,
                connect: Optional[float] = None) -> None:
        """Learn from one attempt: its outcome, latency and connect time (None: never connected)."""

    def start(self, now: float) -> int:
        """A request starts now; the ticket is for observe() and finish()."""
        with self.lock:
            self.tickets += 1
            self.running[self.tickets] = now
            return self.tickets

    def finish(self, ticket: int) -> None:
        """The request of this ticket is over, however it ended."""
        with self.lock:
            if self.running.pop(ticket, None) is None:
                self.stuck.discard(ticket)

    def room(self, now: float) -> int:
        """How many more requests may start now."""
        with self.lock:
            cutoff = now - self.stuck_after()
            while self.running:
                ticket, started = next(iter(self.running.items()))  # the oldest
                if started > cutoff:
                    break
                del self.running[ticket]
                self.stuck.add(ticket)
                self._turned_stuck(ticket)
            in_flight = len(self.running) + len(self.stuck)
            counted = in_flight if self.congested else len(self.running)
            return max(0, min(self.limit - counted, self.capacity - in_flight))

    def _turned_stuck(self, ticket: int) -> None:
        pass

    def next_change(self) -> Optional[float]:
        """When room() can grow with no request ending: the oldest counted request turns stuck."""
        with self.lock:
            after = self.stuck_after()
            if not self.running or after == float("inf"):
                return None
            return next(iter(self.running.values())) + after


class AdaptiveLimit(ConcurrencyLimit):
    """Requests in flight, adapted to the server up to a ceiling (docs/design.md): only valid answers teach
    latency; the base is the median of each batch's opening burst; a request STUCK_RATIO x the base stops
    counting; flat rounds grow the limit, queueing scales it down, pushback (429, a dropped SYN) halves it."""
    INITIAL = 5  # in flight at first: never overflows a listen backlog of 5
    GROWTH_FACTOR = 4  # per round, in slow start
    PROBE_DIVISOR = 8  # after slow start, grow by limit / 8 per flat round
    FLAT_RATIO = 1.5  # a round's lower quartile within this of the base: flat
    QUEUEING_RATIO = 2.5  # over this: requests are queueing at the server
    # The first growth needs flatter rounds, for STARTUP_EVIDENCE_SECONDS, and a base of GROWTH_MIN_BASE:
    # below it the client's own cost (0.5-5 ms a request) hides queueing (measured on the simulator).
    FIRST_ROUND_RATIO = 1.2
    STARTUP_EVIDENCE_SECONDS = 0.02
    GROWTH_MIN_BASE = 0.005
    ROUND_ANSWERS = 8
    STUCK_RATIO = 4.0
    STUCK_FLOOR = 0.05  # seconds; above the client's own scheduling noise
    STUCK_BEFORE_ANY_ANSWER = 1.0  # seconds, while nothing is known of the latency
    STUCK_ROOM = 1  # stuck requests may hold up to ceiling x STUCK_ROOM more threads
    CONNECT_STALL_SECONDS = 0.5  # Linux sends a dropped SYN again after 1 s
    CONNECT_STALL_RATIO = 4.0

    def __init__(self, ceiling: int, initial: int = INITIAL):
        super().__init__(max(1, min(initial, ceiling)))
        self.ceiling = ceiling
        self.slow_start = True
        self.proving = True  # still at the start, gathering evidence for the first growth
        self.evidence = 0.0  # latency covered by flat rounds so far, while proving
        self.recovery = 0  # the limit before a 429, to regain once they stop
        self.cut_guard = 0  # outcomes still to come from requests sent before the last cut
        self.best_connect = float("inf")
        self.base: Optional[float] = None  # this batch's latency with nothing queued
        self.last_base: Optional[float] = None  # the batch before's
        self.fastest: Optional[float] = None  # this batch's fastest answer
        self.burst_at: Optional[float] = None  # when this batch's burst was sent
        self.burst: Dict[int, Optional[float]] = {}  # its tickets -> latency (inf: failed or stuck)
        self.burst_left = 0
        self.round: List[float] = []  # latencies of this round's answers

    @property
    def capacity(self) -> int:
        return self.ceiling * (1 + self.STUCK_ROOM)

    def stuck_after(self) -> float:
        latency = self.base or self.fastest or self.last_base
        if latency is None:
            return self.STUCK_BEFORE_ANY_ANSWER
        return max(self.STUCK_FLOOR, self.STUCK_RATIO * latency)

    def begin_batch(self) -> None:
        with self.lock:
            self.last_base = self.base or self.last_base
            self.base = self.fastest = self.burst_at = None
            self.burst, self.burst_left, self.round = {}, 0, []

    def start(self, now: float) -> int:
        ticket = super().start(now)
        with self.lock:
            if self.burst_at is None:
                self.burst_at = now
            if now == self.burst_at:  # sent in the same breath as the batch's first request
                self.burst[ticket] = None
                self.burst_left += 1
        return ticket

    def _turned_stuck(self, ticket: int) -> None:
        self._burst_answer(ticket, float("inf"))

    def observe(self, ticket: int, outcome: str, latency: float = 0.0,
                connect: Optional[float] = None) -> None:
        with self.lock:
            self.cut_guard -= 1
            if outcome == self.ANSWERED and connect is not None:
                if connect > max(self.CONNECT_STALL_SECONDS, self.CONNECT_STALL_RATIO * self.best_connect):
                    outcome = self.DROPPED  # answered, but only after its SYN was sent again
                else:
                    self.best_connect = min(self.best_connect, connect)
            if outcome in (self.REFUSED, self.DROPPED):
                self._cut(outcome)
            if outcome != self.ANSWERED:
                self._burst_answer(ticket, float("inf"))
                return
            self.fastest = min(self.fastest or latency, latency)
            if ticket in self.burst:
                self._burst_answer(ticket, latency)
            elif ticket not in self.stuck:
                self._learn(latency)

    def _burst_answer(self, ticket: int, latency: float) -> None:
        if ticket not in self.burst or self.burst[ticket] is not None:
            return  # not of the burst, or already told
        self.burst[ticket] = latency
        self.burst_left -= 1
        answered = sorted(seconds for seconds in self.burst.values() if seconds not in (None, float("inf")))
        if self.burst_left > 0 or len(answered) < 2:
            return  # with fewer than two answers, the next round sets the base
        self.base = answered[len(answered) // 2]
        self.round = []
        # A burst answered as one, with no queue behind the first answer, is a flat round.
        if answered[-1] <= self.FIRST_ROUND_RATIO * answered[0]:
            self._flat_start(self.base)

    def _set(self, limit: int) -> None:
        self.limit = max(1, min(self.ceiling, limit))
        self.peak = max(self.peak, self.limit)
        self.round = []

    def _cut(self, outcome: str) -> None:
        if self.cut_guard > 0:
            return  # the same overload, told again by requests sent before the cut
        self.slow_start = self.proving = False
        self.congested = True
        self.recovery = max(self.recovery, self.limit) if outcome == self.REFUSED else 0
        self.cut_guard = self.limit
        self._set(self.limit // 2)

    def _learn(self, latency: float) -> None:
        self.round.append(latency)
        if self.base is None:
            if len(self.round) >= max(self.limit, self.ROUND_ANSWERS):
                # The burst told nothing (most of it failed or got stuck): this round is the base.
                self.base = sorted(self.round)[len(self.round) // 2]
                self.round = []
            return
        flat = latency <= self.FLAT_RATIO * self.base
        if self.slow_start and not self.proving and self._can_grow() and flat:
            # As TCP's slow start: more per answer not queued (fourfold a round, however slow its tail).
            self.limit = min(self.ceiling, self.limit + self.GROWTH_FACTOR - 1)
            self.peak = max(self.peak, self.limit)
        # A round is ROUND_ANSWERS or more once it can cut the limit; the first only decides growth.
        if len(self.round) >= (self.limit if self.proving else max(self.limit, self.ROUND_ANSWERS)):
            latencies = sorted(self.round)
            self._end_round(latencies[len(latencies) // 4], latencies[len(latencies) * 3 // 4], self.base)

    def _end_round(self, quartile: float, upper_quartile: float, base: float) -> None:
        self.round = []
        ratio = quartile / base
        # Every answer slower: the stuck are queued, and count again (the limit must bound the load).
        self.congested = ratio > self.FLAT_RATIO
        if self.congested:
            self.proving = self.slow_start = False  # the first round that is not flat ends slow start
            if ratio > self.QUEUEING_RATIO:
                # About twice what the server serves at its base latency: busy, its queue not overflowing.
                self._set(int(self.limit * 2 / ratio) + 1)
            return
        if self.limit < self.recovery:
            if self.cut_guard <= 0:
                self._set(min(self.recovery, self.limit * 2))
            return
        self.recovery = 0
        # Growth also needs the round's answers close together: the client's own noise spreads those of a
        # server answering one at a time (0.5-12 ms under load), and more would overflow its backlog.
        tight = upper_quartile <= self.FLAT_RATIO * base
        if self.proving and (ratio > self.FIRST_ROUND_RATIO or not tight):
            self.proving = self.slow_start = False
        elif self.proving:
            self._flat_start(quartile)
        elif not self.slow_start and tight and self._can_grow():
            self._set(self.limit + max(1, self.limit // self.PROBE_DIVISOR))

    def _can_grow(self) -> bool:
        """Whether more in flight can help: not where the client's own cost hides any queue, nor while
        answers far faster than the base say it is noise (0.5 ms against 5 ms, measured under load)."""
        return (self.base is not None and self.base >= self.GROWTH_MIN_BASE
                and self.fastest is not None and self.fastest * self.FLAT_RATIO >= self.base)

    def _flat_start(self, latency: float) -> None:
        """A flat round at the start: evidence for the first growth, when the base allows one."""
        if not self.proving or not self._can_grow():
            return
        self.evidence += latency
        if self.evidence >= self.STARTUP_EVIDENCE_SECONDS:
            self.proving = False
            self._set(self.limit * self.GROWTH_FACTOR)  # slow start goes on answer by answer


class CpxClient:
    """Reads the CPX API with timeouts, a deadline, retries and bounded concurrency."""
    def __init__(self, options: Options):
        from concurrent.futures import ThreadPoolExecutor
        self.options = options
        self.watchdog = Watchdog()
        self.opener = _build_opener(self.watchdog, _origin(options.url)[0])
        self.limiter = (AdaptiveLimit if options.adaptive else ConcurrencyLimit)(options.workers)
        self.retried = 0  # retries made, for -v; workers add to it under the lock
        self.retried_lock = threading.Lock()
        # One more thread than requests may be in flight: /servers never waits for a free one.
        self.executor = ThreadPoolExecutor(max_workers=self.limiter.capacity + 1)
        credentials = {} if options.authorization is None else {"Authorization": options.authorization}
        self.headers = {"Accept": "application/json", "User-Agent": "cpx_devops/" + __version__, **credentials}

    def close(self) -> None:
        """Let go of the worker threads without waiting for requests still in flight."""
        self.executor.shutdown(wait=False)
        self.watchdog.close()

    def _get_once(self, url: str, cap: int, deadline: float) -> Tuple[bytes, Optional[float]]:
        """One attempt, whole life bounded by --timeout and the deadline: (body, connect seconds)."""
        import http.client
        import urllib.error
        import urllib.request
        started = time.monotonic()
        give_up_at = min(started + self.options.timeout, deadline)
        if give_up_at <= started:
            raise FetchError("deadline")
        # Out of time before the request's own timeout: the deadline's doing, and said so.
        late = FetchError("timeout", retryable=True) if give_up_at < deadline else FetchError("deadline")
        request = urllib.request.Request(url, headers=self.headers)
        guard = self.watchdog.arm(give_up_at)
        try:
            with self.opener.open(request, timeout=give_up_at - started) as response:
                body = _read_capped(response, cap)
        except urllib.error.HTTPError as error:
            try:
                detail = error.read(200).decode("utf-8", "replace")
            except (OSError, ValueError):  # the error body is only decoration
                detail = ""
            finally:
                error.close()
            raise FetchError("HTTP %d" % error.code, retryable=error.code in RETRYABLE_HTTP_STATUSES,
                             retry_after=parse_retry_after(error.headers.get("Retry-After")),
                             detail=sanitize(" ".join(detail.split()))[:120],
                             pushback=ConcurrencyLimit.REFUSED if error.code == 429 else None)
        except (OSError, http.client.HTTPException, UnicodeError) as error:
            # Network and HTTP failures only (UnicodeError: a host IDNA cannot encode): a bug surfaces.
            failure = _describe_network_error(error)
            if guard.fired or failure.reason == "timeout":
                # Out of time before connecting: a listen queue dropping SYNs, for the limiter.
                dropped = guard.connect_seconds is None and late.reason == "timeout"
                failure = FetchError(late.reason, late.retryable,
                                     pushback=ConcurrencyLimit.DROPPED if dropped else None)
            raise failure
        finally:
            self.watchdog.disarm(guard)
        if guard.fired:
            raise late  # cut mid-body: what was read may be short
        return body, guard.connect_seconds

    def get_json(self, path: str, cap: int, deadline: float, ticket: Optional[int] = None) -> Any:
        """GET --url + path as JSON, retried while worth it; ticket: the limiter's, told each attempt."""
        import json
        limiter = self.limiter
        for attempt in range(self.options.retries + 1):
            started = time.monotonic()
            try:
                body, connect_seconds = self._get_once(self.options.url + path, cap, deadline)
                break
            except FetchError as error:
                if ticket is not None:
                    limiter.observe(ticket, error.pushback or limiter.FAILED)
                if not error.retryable or attempt >= self.options.retries:
                    raise
                delay = backoff_delay(attempt, error.retry_after)
                if time.monotonic() + delay >= deadline:
                    raise
                time.sleep(delay)
                with self.retried_lock:
                    self.retried += 1
        if ticket is not None:
            limiter.observe(ticket, limiter.ANSWERED, time.monotonic() - started, connect_seconds)
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise FetchError("not JSON")

    def read_instance(self, ip: str, deadline: float, ticket: Optional[int] = None) -> Instance:
        """One instance; any failure becomes an Unknown instance with its reason."""
        try:
            return parse_instance(ip, self.get_json("/" + ip, INSTANCE_BODY_CAP, deadline, ticket))
        except FetchError as error:
            return Instance(ip, error=error.reason)

    def list_servers(self, deadline: float) -> ServerList:
        """The fleet from /servers; CpxUnavailable when it cannot be read or is not a list."""
        from concurrent.futures import TimeoutError as FutureTimeout
        url = self.options.url + "/servers"
        # Run in a worker so that even a hanging DNS lookup cannot outlive the deadline.
        future = self.executor.submit(self.get_json, "/servers", SERVERS_BODY_CAP, deadline)
        try:
            payload = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except (FutureTimeout, FetchError) as error:  # the wait's end, or the watchdog's cut: the same words
            if isinstance(error, FutureTimeout) or error.reason == "deadline":
                raise CpxUnavailable("GET %s: no answer within the deadline" % url)
            raise CpxUnavailable("GET %s: %s%s" % (url, error.reason, ": " + error.detail if error.detail else ""))
        try:
            servers = parse_server_list(payload)
        except ValueError as error:
            raise CpxUnavailable("GET %s: %s" % (url, error))
        if time.monotonic() >= deadline:
            raise CpxUnavailable("GET %s: the deadline passed while its %s were read; no instance was read"
                                 % (url, _plural(len(payload), "entry", "entries")))
        shard = self.options.shard
        if shard is None:
            return servers
        mine = [ip for ip in servers.ips if shard.holds(ip)]
        return servers._replace(ips=mine, other_shards=len(servers.ips) - len(mine))

    def read_instances(self, ips: Sequence[str], deadline: float) -> List[Instance]:
        """All the given instances, concurrently within the limit; late ones are Unknown (deadline)."""
        import queue
        results: Dict[str, Instance] = {}
        waiting = list(reversed(ips))
        # A queue: one wake-up per answer (futures.wait() would lock every future in flight each time).
        finished: Any = queue.SimpleQueue()
        in_flight: Dict[Any, Tuple[str, int]] = {}  # future -> (ip, limiter ticket)
        limiter = self.limiter
        limiter.begin_batch()
        while waiting or in_flight:
            now = time.monotonic()
            for _ in range(min(len(waiting), limiter.room(now))):
                ip = waiting.pop()
                ticket = limiter.start(now)
                future = self.executor.submit(self.read_instance, ip, deadline, ticket)
                in_flight[future] = (ip, ticket)
                future.add_done_callback(finished.put)
            # Wake up for an answer, the deadline, or a request turning stuck (room for one more).
            wake = min(deadline, limiter.next_change() or deadline)
            try:
                future = finished.get(timeout=max(0.0, wake - now))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    break
                continue
            ip, ticket = in_flight.pop(future)
            limiter.finish(ticket)
            results[ip] = future.result()
        for future, (_, ticket) in in_flight.items():
            future.cancel()  # one still running is cut by the watchdog at the deadline
            limiter.finish(ticket)
        return [results.get(ip) or Instance(ip, error="deadline") for ip in ips]


# Renderers: table, json, csv, prometheus; sanitising of server text -------------------------------

# What a terminal must never be sent from a server (docs/design.md, "Untrusted data"): C0, DEL, C1,
# Unicode 15.1's Cf, Default_Ignorable_Code_Point, line and paragraph separators, lone surrogates,
# as ranges so every Python agrees. Limit: an emoji's U+FE0F shows as '?'. A pattern: compiled on use.
UNSAFE_TEXT = ("[\x00-\x1f\x7f-\x9f\xad\u034f\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2"
               "\u115f-\u1160\u17b4-\u17b5\u180b-\u180f\u200b-\u200f\u2028-\u202e\u2060-\u206f\u3164"
               "\ud800-\udfff\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f"
               "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]")
COLORS = {UNHEALTHY: "31", UNKNOWN: "33", "stale": "2"}
SPARK_BLOCKS = "\u2581\u2582\u2583\u2584\u2585\u2586\u2587\u2588"
SPARK_ASCII = "_.,-~=*#"


def sanitize(text: Any) -> str:
    """Server text made safe for a terminal: each unsafe character (above) becomes '?'."""
    return re.sub(UNSAFE_TEXT, "?", str(text))


def escape_unsafe(text: str) -> str:
    """Server text safe but distinct: unsafe characters as \\x, \\u or \\U escapes, '\\' doubled."""
    def escape(match: Any) -> str:
        code = ord(match.group())
        if code == 0x5C:
            return "\\\\"
        return "\\x%02x" % code if code < 0x100 else "\\u%04x" % code if code < 0x10000 else "\\U%08x" % code
    return re.sub("\\\\|" + UNSAFE_TEXT, escape, text)


def display_width(text: str) -> int:
    """Terminal columns: wide characters 2; combining, format, unsafe and conjoining-jamo ones 0."""
    if text.isascii() and text.isprintable():  # the usual case, at C speed
        return len(text)
    import unicodedata
    return sum(0 if unicodedata.category(char) in ("Mn", "Me") or re.match(UNSAFE_TEXT, char)
               or re.match("[\u1160-\u11ff\ud7b0-\ud7ff]", char)
               else 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1 for char in text)


def clip(text: str, width: Optional[int]) -> str:
    """text cut to width columns (None: all of it), ending in '~' where it was cut."""
    if width is None or display_width(text) <= width:
        return text
    used = 0
    for index, char in enumerate(text):
        used += display_width(char)
        if used >= width:
            return text[:index] + "~"
    return text


def paint(text: str, status: Optional[str], color: bool) -> str:
    """Wrap text in the colour of a status when colour is on."""
    code = COLORS.get(status or "")
    return "\x1b[%sm%s\x1b[0m" % (code, text) if color and code else text


class Column(NamedTuple):
    """A table's column: its title, and whether its cells are right-aligned (numbers)."""
    title: str
    right: bool = False


def render_table(columns: Sequence[Column], rows: Sequence[Sequence[str]], colors: Any = None,
                 color: bool = False, headers: bool = True) -> str:
    """An org-style table; colors gives a status per row, for its colour."""
    widths = [max([display_width(column.title)] + [display_width(row[k]) for row in rows])
              for k, column in enumerate(columns)]

    def line(cells: Sequence[str], status: Optional[str] = None) -> str:
        padded = []
        for cell, width, column in zip(cells, widths, columns):
            gap = " " * (width - display_width(cell))
            padded.append(paint(gap + cell if column.right else cell + gap, status, color))
        return "| " + " | ".join(padded) + " |\n"

    rule = "|" + "+".join("-" * (w + 2) for w in widths) + "|\n"
    top = [line([c.title for c in columns]), rule] if headers else []
    return "".join(top + [line(row, colors[k] if colors else None) for k, row in enumerate(rows)])


def shown_percent(value: float, decimals: int, threshold: Optional[float] = None) -> str:
    """value with `decimals`, or more (up to 3) to stay on its side of the threshold and of 100
    (90.004 never reads 90.0, nor 99.999 100); past 3, rounded towards its side."""
    import math
    def same_side(shown: float) -> bool:
        return ((threshold is None or (shown > threshold) == (value > threshold))
                and (shown >= 100) == (value >= 100))

    for places in range(decimals, max(decimals, 3) + 1):
        text = "%.*f" % (places, value)
        if same_side(float(text)):
            return text
    rounded = [r for r in (math.floor(value * 1000) / 1000, math.ceil(value * 1000) / 1000) if same_side(r)]
    return "%.3f" % rounded[0] if rounded else text


def format_percents(values: Sequence[Optional[float]], threshold: Any = None) -> List[str]:
    """One precision per column (see shown_percent); threshold: one, or a list with one per value."""
    known = [v for v in values if v is not None]
    decimals = 0 if all(float(v).is_integer() for v in known) else 1
    limits = threshold if isinstance(threshold, list) else [threshold] * len(values)
    return ["-" if v is None else shown_percent(v, decimals, limits[k]) + "%" for k, v in enumerate(values)]


def percent_cells(values: Sequence[Optional[float]], limits: List[float]) -> List[str]:
    """A table column of percentages, '!' after a value over its threshold (seen without colour)."""
    cells = format_percents(values, limits)
    return [cell + "!" if value is not None and value > limit else cell
            for cell, value, limit in zip(cells, values, limits)]


def _json_number(value: Optional[float], threshold: Optional[float] = None) -> Optional[float]:
    """A percentage for json/csv: an int when whole, else 2 decimals (more where they decide)."""
    if value is None:
        return None
    return int(value) if float(value).is_integer() else float(shown_percent(value, 2, threshold))


def service_label(service: Optional[str]) -> str:
    """How a service name is shown in a table."""
    return "(unknown)" if service is None else sanitize(service)


def status_label(instance: Instance, policy: Policy) -> str:
    """Status as shown in a table, with the reason for Unknown."""
    status = instance_status(instance, policy)
    return "%s (%s)" % (status, sanitize(instance.error)) if instance.error else status


# The columns of every table, each said once: the reports and track's views pick theirs.
IP, SERVICE, STATUS = Column("IP"), Column("Service"), Column("Status")
CPU, MEMORY, OVER = Column("CPU", True), Column("Memory", True), Column("Over threshold")
INSTANCES, HEALTHY_COUNT = Column("Instances", True), Column("Healthy", True)
MIN_HEALTHY = Column("Min healthy", True)
AVG_CPU, MAX_CPU = Column("Avg CPU", True), Column("Max CPU", True)
AVG_MEMORY, MAX_MEMORY = Column("Avg Memory", True), Column("Max Memory", True)
MAX_CPU_AT, MAX_MEMORY_AT = Column("Max CPU at"), Column("Max Memory at")


def instance_cells(instances: Sequence[Instance], policy: Policy) -> List[Dict[Column, str]]:
    """The table cells of instance rows, by column: one precision per column, '!' over thresholds."""
    limits = [policy.limits(i.service) for i in instances]
    cpus = percent_cells([i.cpu for i in instances], [cpu for cpu, _ in limits])
    memories = percent_cells([i.memory for i in instances], [memory for _, memory in limits])
    return [{IP: sanitize(i.ip), SERVICE: service_label(i.service), STATUS: status_label(i, policy),
             CPU: cpus[k], MEMORY: memories[k], OVER: ", ".join(instance_reasons(i, policy)) or "-"}
            for k, i in enumerate(instances)]


def summary_cells(summaries: Sequence[ServiceSummary], policy: Policy) -> List[Dict[Column, str]]:
    """The table cells of service rows, by column: one precision per column, '!' over thresholds."""
    limits = [policy.limits(s.service) for s in summaries]
    cpu, memory = [limit for limit, _ in limits], [limit for _, limit in limits]
    fields = ((AVG_CPU, "avg_cpu", cpu), (MAX_CPU, "max_cpu", cpu), (AVG_MEMORY, "avg_memory", memory),
              (MAX_MEMORY, "max_memory", memory))
    columns = {c: percent_cells([getattr(s, name) for s in summaries], limit) for c, name, limit in fields}
    return [{**{column: cells[k] for column, cells in columns.items()}, HEALTHY_COUNT: str(s.healthy),
             SERVICE: service_label(s.service) + ("" if s.instances else " (missing)"),
             MIN_HEALTHY: str(policy.min_healthy_for(s.service, s.instances)), INSTANCES: str(s.instances),
             MAX_CPU_AT: sanitize(s.max_cpu_ip or "-"), MAX_MEMORY_AT: sanitize(s.max_memory_ip or "-")}
            for k, s in enumerate(summaries)]


def instance_record(instance: Instance, policy: Policy) -> Dict[str, Any]:
    """The json/csv fields of an instance (reasons: the resources over their thresholds)."""
    cpu, memory = policy.limits(instance.service)
    return {"ip": instance.ip, "service": instance.service, "status": instance_status(instance, policy),
            "cpu": _json_number(instance.cpu, cpu), "memory": _json_number(instance.memory, memory),
            "error": instance.error, "reasons": instance_reasons(instance, policy)}


def summary_record(summary: ServiceSummary, policy: Policy) -> Dict[str, Any]:
    """The json/csv fields of a service summary."""
    cpu, memory = policy.limits(summary.service)
    return {"service": summary.service, "instances": summary.instances, "healthy": summary.healthy,
            "avg_cpu": _json_number(summary.avg_cpu, cpu), "max_cpu": _json_number(summary.max_cpu, cpu),
            "avg_memory": _json_number(summary.avg_memory, memory), "max_memory_ip": summary.max_memory_ip,
            "max_memory": _json_number(summary.max_memory, memory), "max_cpu_ip": summary.max_cpu_ip,
            "min_healthy": policy.min_healthy_for(summary.service, summary.instances)}


def csv_cell(value: Any) -> str:
    """A csv cell: None empty, text sanitised, and a formula (= + - @) prefixed with ' (OWASP)."""
    if value is None:
        return ""
    if isinstance(value, list):  # reasons: "cpu;memory"
        return ";".join(csv_cell(item) for item in value)
    if isinstance(value, bool):  # as json writes it
        return "true" if value else "false"
    if not isinstance(value, str):
        return str(value)
    text = sanitize(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def render_csv(fieldnames: Sequence[str], records: Sequence[Dict[str, Any]], header: bool = True) -> str:
    """A header then one row per record (cells as csv_cell makes them)."""
    import csv
    import io
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(fieldnames)
    writer.writerows([csv_cell(record[name]) for name in fieldnames] for record in records)
    return buffer.getvalue()


def fleet_footer(instances: Sequence[Instance], policy: Policy) -> str:
    """The line under a table: instances, services, and unhealthy and unknown instances."""
    statuses = [instance_status(i, policy) for i in instances]
    services = {i.service for i in instances if i.service is not None}
    text = "%s, %s, %s" % (_plural(len(instances), "instance"), _plural(len(services), "service"),
                           _plural(statuses.count(UNHEALTHY), "unhealthy instance"))
    if statuses.count(UNKNOWN):
        text += ", %s" % _plural(statuses.count(UNKNOWN), "unknown instance")
    return text + "\n"


def prometheus_label(value: Optional[str]) -> str:
    """A label value: unsafe characters escaped (two services never share a series), then \\, \", \\n."""
    text = escape_unsafe(value) if value is not None else ""
    return text.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


PROMETHEUS_FAMILIES = (
    ("cpx_instance_cpu_ratio", "CPU use of an instance, 0-1 (absent when it could not be read)."),
    ("cpx_instance_memory_ratio", "Memory use of an instance, 0-1 (absent when it could not be read)."),
    ("cpx_instance_healthy", "1 when the instance is Healthy (cpu and memory at or under their thresholds)."),
    ("cpx_instance_up", "1 when the instance could be read, 0 when it could not or its data was invalid."),
    ("cpx_service_instances", "Instances of a service (0 for an expected service that has none)."),
    ("cpx_service_healthy_instances", "Healthy instances of a service (0 for an expected one with none)."),
    ("cpx_service_min_healthy_instances", "Healthy instances a service needs: its policy's minimum."),
    ("cpx_service_expected", "1 for every service the policy expects, whether or not it has instances."),
    ("cpx_service_flagged", "1 when unhealthy flags the service (under its minimum, or missing), else 0."),
    ("cpx_service_threshold_ratio", "A service's threshold, 0-1, by resource: Unhealthy above it."),
    ("cpx_threshold_ratio", "The default threshold, 0-1, by resource, of services without their own."),
    ("cpx_scrape_duration_seconds", "How long reading CPX took."),
    ("cpx_scrape_errors", "Instances that could not be read in this scrape."),
)


def render_prometheus(snapshot: Snapshot, policy: Policy, per_instance: bool = True,
                      flagged: Optional[Sequence[ServiceSummary]] = None, shard: Optional[Shard] = None,
                      chosen: Optional[Set[str]] = None) -> str:
    """The exposition format; every expected (chosen) service has its series, so that none vanishes."""
    tail = (("shard", str(shard)),) if shard is not None else ()
    samples: Dict[str, List[str]] = {name: [] for name, _ in PROMETHEUS_FAMILIES}

    def add(name: str, pairs: Sequence[Tuple[str, Optional[str]]], value: float,
            places: Optional[int] = 6) -> None:  # an int when whole, else the float, rounded to places
        labels = tuple(pairs) + tail
        text = ",".join('%s="%s"' % (key, prometheus_label(label)) for key, label in labels)
        number = float(value if places is None else round(value, places))
        shown = str(int(number)) if number.is_integer() else repr(number)
        samples[name].append(("{%s}" % text if labels else "") + " " + shown)

    instances = sort_instances(snapshot.instances, "service", policy)
    for instance in instances if per_instance else ():
        labels = (("ip", instance.ip), ("service", instance.service))
        if instance.readable:
            add("cpx_instance_cpu_ratio", labels, (instance.cpu or 0.0) / 100.0, None)
            add("cpx_instance_memory_ratio", labels, (instance.memory or 0.0) / 100.0, None)
        add("cpx_instance_healthy", labels, instance_status(instance, policy) == HEALTHY)
        add("cpx_instance_up", labels, instance.readable)
    flagged_services = {s.service for s in flagged or ()}
    for summary in fleet_summaries(instances, policy, chosen):
        if summary.service is None:
            continue  # unreadable instances count in cpx_scrape_errors and cpx_instance_up
        service = (("service", summary.service),)
        add("cpx_service_instances", service, summary.instances)
        add("cpx_service_healthy_instances", service, summary.healthy)
        add("cpx_service_min_healthy_instances", service,
            policy.min_healthy_for(summary.service, summary.instances))
        if summary.service in policy.services:
            add("cpx_service_expected", service, 1)
        if flagged is not None:
            add("cpx_service_flagged", service, summary.service in flagged_services)
        for resource, limit in zip(("cpu", "memory"), policy.limits(summary.service)):
            add("cpx_service_threshold_ratio", service + (("resource", resource),), limit / 100.0)
    for resource, limit in (("cpu", policy.cpu), ("memory", policy.memory)):
        add("cpx_threshold_ratio", (("resource", resource),), limit / 100.0)
    add("cpx_scrape_duration_seconds", (), snapshot.seconds)
    add("cpx_scrape_errors", (), sum(1 for i in instances if not i.readable))
    lines = []
    for name, help_text in PROMETHEUS_FAMILIES:
        if samples[name]:
            lines += ["# HELP %s %s" % (name, help_text), "# TYPE %s gauge" % name]
            lines += [name + sample for sample in samples[name]]
    return "\n".join(lines) + "\n"


class Report:
    """A snapshot command's result, a row per service unless said otherwise; an as_<format> per format."""
    COLUMNS: Sequence[Column] = ()  # the table's
    WIDE: Sequence[Column] = ()  # the columns -o wide adds
    FIELDS: Sequence[str] = ()  # the json/csv fields; new ones go last, so a csv column keeps its place
    PER_INSTANCE = False  # Prometheus: the instance families too, or per service only

    def __init__(self, rows: Sequence[Any], snapshot: Snapshot, policy: Policy, shard: Optional[Shard] = None,
                 chosen: Optional[Set[str]] = None):
        self.rows = rows  # the instances or services shown, in order
        self.snapshot = snapshot  # its instances: those of the chosen services (all, when None)
        self.policy = policy
        self.shard = shard
        self.chosen = chosen

    def cells(self) -> List[Dict[Column, str]]:
        """The table's cells, a dict by column per row."""
        return summary_cells(self.rows, self.policy)

    def record(self, row: Any) -> Dict[str, Any]:
        """A row's json/csv fields, but its time."""
        return summary_record(row, self.policy)

    def records(self) -> List[Dict[str, Any]]:
        """The json/csv records, with the snapshot's time, their fields in FIELDS' order."""
        records = [dict(self.record(row), time=self.snapshot.started) for row in self.rows]
        return [{name: record[name] for name in self.FIELDS} for record in records]

    def statuses(self) -> Optional[List[str]]:
        """A status per row, for its colour."""
        return None

    def footer(self) -> str:
        """The line under a table with headers."""
        return fleet_footer(self.snapshot.instances, self.policy)

    def empty(self) -> Optional[str]:
        """What a table with no row says instead, if anything."""
        return None

    def flagged(self) -> Optional[Sequence[ServiceSummary]]:
        """The services this command flags, for cpx_service_flagged; None when it judges none."""
        return None

    def render(self, options: Options) -> str:
        """The report in options.output's format."""
        return getattr(self, "as_" + options.output)(options)

    def as_table(self, options: Options, wide: bool = False) -> str:
        empty = self.empty()
        if not self.rows and empty is not None:
            return empty
        columns = tuple(self.COLUMNS) + (tuple(self.WIDE) if wide else ())
        rows = [[cells[c] for c in columns] for cells in self.cells()]
        table = render_table(columns, rows, self.statuses(), options.color, options.headers)
        return table + self.footer() if options.headers else table

    def as_wide(self, options: Options) -> str:
        return self.as_table(options, wide=True)

    def as_json(self, options: Options) -> str:
        import json
        return json.dumps(self.records(), indent=2) + "\n"

    def as_csv(self, options: Options) -> str:
        return render_csv(self.FIELDS, self.records(), options.headers)

    def as_prometheus(self, options: Options) -> str:
        return render_prometheus(self.snapshot, self.policy, self.PER_INSTANCE, self.flagged(), self.shard,
                                 self.chosen)


class InstancesReport(Report):
    """services: a row per instance, in the order given, and the fleet's footer."""
    COLUMNS, WIDE = (IP, SERVICE, STATUS, CPU, MEMORY), (OVER,)
    FIELDS = ("ip", "service", "status", "cpu", "memory", "error", "reasons", "time")
    PER_INSTANCE = True

    def cells(self) -> List[Dict[Column, str]]:
        return instance_cells(self.rows, self.policy)

    def record(self, row: Any) -> Dict[str, Any]:
        return instance_record(row, self.policy)

    def statuses(self) -> Optional[List[str]]:
        return [instance_status(i, self.policy) for i in self.rows]

    def footer(self) -> str:
        return fleet_footer(self.rows, self.policy)


class SummariesReport(Report):
    """status: a row per service (an expected service with no instance too), and the fleet's footer."""
    COLUMNS = (SERVICE, INSTANCES, HEALTHY_COUNT, AVG_CPU, MAX_CPU, AVG_MEMORY, MAX_MEMORY)
    WIDE = (MIN_HEALTHY, MAX_CPU_AT, MAX_MEMORY_AT)
    FIELDS = ("service", "instances", "healthy", "avg_cpu", "avg_memory", "max_cpu", "max_memory",
              "max_cpu_ip", "max_memory_ip", "time", "min_healthy")

    def statuses(self) -> Optional[List[str]]:
        return [UNHEALTHY if not s.instances else "" for s in self.rows]  # a missing service in red


class FlaggedReport(Report):
    """unhealthy: a row per flagged service, worst first; a sentence when there is none."""
    COLUMNS = (SERVICE, HEALTHY_COUNT, INSTANCES, Column("Minimum", True), Column("Problem"))
    FIELDS = ("service", "healthy", "instances", "time", "min_healthy", "missing")

    def cells(self) -> List[Dict[Column, str]]:
        return [{**cells, SERVICE: service_label(s.service), self.COLUMNS[3]: cells[MIN_HEALTHY],
                 self.COLUMNS[4]: flag_problem(s)} for s, cells in zip(self.rows, super().cells())]

    def record(self, row: Any) -> Dict[str, Any]:
        return dict(summary_record(row, self.policy), missing=not row.instances)

    def statuses(self) -> Optional[List[str]]:
        return [UNHEALTHY] * len(self.rows)

    def flagged(self) -> Optional[Sequence[ServiceSummary]]:
        return self.rows

    def footer(self) -> str:
        return ""

    def empty(self) -> Optional[str]:
        policy = self.policy
        if policy.services:
            count = len(policy.services)
            return "Every service has its minimum of healthy instances, and the %d expected %s.\n" % (
                count, "service is present" if count == 1 else "services are all present")
        if isinstance(policy.min_healthy, HealthyCount):
            return "Every service has at least %s.\n" % _plural(policy.min_healthy.least, "healthy instance")
        return "Every service has at least %s of its instances healthy.\n" % (policy.min_healthy,)


OUTPUT_FORMATS = tuple(name[3:] for name in vars(Report) if name.startswith("as_"))
REPORTS = {"services": InstancesReport, "status": SummariesReport, "unhealthy": FlaggedReport}


# Output, and the snapshot commands: services, status, unhealthy -----------------------------------


def say(message: str) -> None:
    """One line on stderr; nothing when stderr is closed or failing (the exit status still tells)."""
    with contextlib.suppress(AttributeError, OSError, ValueError):  # None when started with 2>&-
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


def warn(options: Options, message: str) -> None:
    """A warning on stderr, one line, unless --quiet."""
    if not options.quiet:
        say("%s: warning: %s" % (program_name(), message))


def _write_all(descriptor: int, data: bytes) -> None:
    """Every byte to the descriptor, a full non-blocking one waited on (Python's stream drops bytes)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(descriptor, view):]
        except BlockingIOError:
            import select
            select.select([], [descriptor], [])


def emit(text: str) -> None:
    """All of text to stdout now ('?' for what its encoding lacks); OutputFailed, or BrokenPipeError."""
    stream = sys.stdout
    if stream is None:
        raise OutputFailed("stdout is closed")
    try:
        descriptor: Optional[int] = stream.fileno()
    except (OSError, ValueError):  # an in-memory stream: a test's, or a program's that embeds this one
        descriptor = None
    try:
        stream.flush()  # whatever went through the stream before
        if descriptor is None:
            stream.write(text)
            stream.flush()
        else:  # a piece at a time: a large output is never held twice, as text and as bytes
            encoding = getattr(stream, "encoding", None) or "utf-8"
            for start in range(0, len(text), 1 << 16):
                _write_all(descriptor, text[start:start + (1 << 16)].encode(encoding, "replace"))
    except BrokenPipeError:
        raise
    except OSError as error:
        raise OutputFailed("cannot write to stdout: %s" % (error.strerror or error))


def write_target(path: str) -> Tuple[str, Any]:
    """The file --write PATH replaces (via symlinks), and its stat (None: new); UsageError if not regular."""
    if not path:
        raise UsageError("--write needs a file name")
    if path.endswith(os.sep) or os.path.basename(path) in (".", ".."):
        raise UsageError("cannot write %s: it names a directory, not a file" % sanitize(path))
    try:
        status = os.stat(path)  # through any symlink: what PATH stands for
    except FileNotFoundError:  # a new name, or a symlink to one
        status = None
    except OSError as error:  # a symlink loop, a permission denied on the way
        raise UsageError("cannot write %s: %s" % (sanitize(path), error.strerror or error))
    kind = file_kind(status.st_mode) if status is not None else None
    if kind:
        raise UsageError("cannot write %s: it is %s, not a regular file" % (sanitize(path), kind))
    target = os.path.realpath(path)
    if not os.path.isdir(os.path.dirname(target)):
        raise UsageError("cannot write %s: no directory %s" % (sanitize(path), sanitize(os.path.dirname(target))))
    return target, status


def _temporary_beside(target: str) -> Tuple[int, str]:
    """A new temporary file in the target's directory (the same file system: the rename is atomic)."""
    import tempfile
    folder, name = os.path.split(target)
    return tempfile.mkstemp(prefix="." + name + ".", suffix=".tmp", dir=folder)


def check_writable(path: str) -> None:
    """Refuse an unwritable --write FILE before any request, by making its temporary file for real."""
    target, _ = write_target(path)
    try:
        handle, temporary = _temporary_beside(target)
    except OSError as error:
        raise UsageError("cannot write %s: %s" % (sanitize(path), error.strerror or error))
    os.close(handle)
    os.unlink(temporary)


def _replace_with(target: str, text: str, mode: Optional[int] = None, owner: Any = None) -> None:
    """Write text beside target, then rename it over: a reader sees the old file or the new, never half."""
    handle, temporary = _temporary_beside(target)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", errors="replace") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        if mode is not None:
            os.chmod(temporary, mode)
        if owner is not None:
            os.chown(temporary, *owner)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_atomically(path: str, text: str) -> None:
    """Replace path with text atomically, keeping its mode (and owner, for root); new: 0666 less the umask."""
    target, old = write_target(path)
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask if old is None else old.st_mode & 0o7777  # stat.S_IMODE
    root = getattr(os, "geteuid", lambda: None)() == 0  # POSIX only: Windows has no owners to keep
    owner = (old.st_uid, old.st_gid) if old is not None and root else None
    try:
        _replace_with(target, text, mode, owner)
    except OSError as error:
        raise OutputFailed("cannot write %s: %s" % (sanitize(path), error.strerror or error))


def deliver(text: str, options: Options) -> None:
    """A command's output: to stdout, or atomically to the --write file."""
    if options.write is not None:
        write_atomically(options.write, text)
    else:
        emit(text)


def completable(name: str) -> bool:
    """Whether completion may offer a name: no leading '-', nothing unsafe for a terminal."""
    return bool(name) and not name.startswith("-") and not re.search(UNSAFE_TEXT, name)


def remember_services(instances: Iterable[Instance], options: Options) -> None:
    """Keep the services seen for shell completion: in a folder of the user's own (made 0700), by a rename, at
    most SERVICE_CACHE_CAP bytes. A folder or file not the user's own, or not what it should be (a symlink),
    is left alone, as is any failure (a convenience). Limit: the folders above the cache home are trusted."""
    import stat
    cache = options.service_cache
    if cache is None:
        return
    folder = os.path.dirname(cache)
    lines, size = [], 0
    for name in sorted({i.service for i in instances if i.service is not None}):
        size += len(name.encode("utf-8", "replace")) + 1
        if size > SERVICE_CACHE_CAP:
            break
        lines += [name + "\n"] if completable(name) else []
    mine = getattr(os, "geteuid", lambda: None)()
    with contextlib.suppress(OSError):
        # The cache home (~/.cache), made if need be, only in a home of the user's own (not under sudo).
        home = os.path.dirname(folder)
        if mine not in (None, os.stat(home if os.path.isdir(home) else os.path.dirname(home)).st_uid):
            return
        os.makedirs(home, 0o700, exist_ok=True)
        os.makedirs(folder, 0o700, exist_ok=True)  # one there already: checked below
        found = os.lstat(folder)
        if not stat.S_ISDIR(found.st_mode) or found.st_mode & 0o022 or mine not in (None, found.st_uid):
            return
        if os.path.lexists(cache) and not stat.S_ISREG(os.lstat(cache).st_mode):
            return
        _replace_with(cache, "".join(lines))


def list_fleet(client: Any, options: Options, deadline: float) -> List[str]:
    """The IPs /servers lists; a warning for entries refused, CpxUnavailable when there is none."""
    import json
    servers = client.list_servers(deadline)
    if servers.rejected:
        shown = [sanitize(json.dumps(entry))[:60] for entry in servers.rejected[:IPS_LISTED_PER_REASON]]
        warn(options, "/servers listed %s, not requested: %s" % (_plural(
            len(servers.rejected), "entry that is not an IP address", "entries that are not IP addresses"),
            _listed(shown, len(servers.rejected))))
    if servers.duplicates:
        warn(options, "/servers listed %s, each address requested once"
             % _plural(servers.duplicates, "duplicate entry", "duplicate entries"))
    if not servers.ips and not servers.other_shards:  # a shard with no instance of its own is no failure
        raise CpxUnavailable("GET %s/servers: no instance listed" % options.url)
    return servers.ips


def utc_now() -> str:
    """This moment in ISO 8601, UTC, to the millisecond: the time of every record and view."""
    from datetime import datetime, timezone
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def take_snapshot(client: Any, options: Options, deadline: Optional[float] = None) -> Snapshot:
    """Read the whole fleet once; warn about what could not be read, raise if nothing could."""
    started = utc_now()
    scrape_started = time.monotonic()
    deadline = scrape_started + (options.deadline or DEFAULT_DEADLINE) if deadline is None else deadline
    ips = list_fleet(client, options, deadline)
    reads_started = time.monotonic()
    instances = client.read_instances(ips, deadline)
    if options.verbose:
        say("%s: read %s in %.2f s, peak concurrency %d (ceiling %d), %s" % (
            program_name(), _plural(len(instances), "instance"), time.monotonic() - reads_started,
            client.limiter.peak, options.workers, _plural(client.retried, "retry", "retries")))
    failures = summarize_failures(instances)
    if failures and not any(i.readable for i in instances):
        raise CpxUnavailable("%s: %s" % (options.url, failures))
    if failures:
        warn(options, failures)
    return Snapshot(instances, time.monotonic() - scrape_started, started)


def chosen_services(snapshot: Snapshot, patterns: Sequence[str], options: Options) -> Optional[Set[str]]:
    """The services patterns mean (seen or expected), None for all; under --shard, unknown ones warn."""
    if not patterns:
        return None
    unreadable = sum(1 for i in snapshot.instances if i.service is None)
    known = [i.service for i in snapshot.instances if i.service is not None] + list(options.policy.services)
    if options.shard is None:
        return set(resolve_services(patterns, known, unreadable))
    chosen: Set[str] = set()
    for pattern in patterns:
        try:
            chosen.update(resolve_services([pattern], known, unreadable))
        except UsageError:
            warn(options, "--shard %s: no instance of %r in this shard" % (options.shard, sanitize(pattern)))
    return chosen


def snapshot_report(kind: Any, client: Any, options: Options, services: Sequence[str] = (),
                    statuses: Sequence[str] = (), sort: str = "service", reverse: bool = False,
                    strict: bool = False, deadline: Optional[float] = None) -> Tuple[Report, int]:
    """Read the fleet; the report of kind (a Report class), and the exit status once it is out."""
    whole = take_snapshot(client, options, deadline)
    chosen = chosen_services(whole, services, options)
    snapshot = whole._replace(instances=[i for i in whole.instances if chosen is None or i.service in chosen])
    policy = options.policy
    if kind is InstancesReport:
        rows: List[Any] = sort_instances(filter_statuses(snapshot.instances, statuses, policy), sort, policy)
    elif kind is SummariesReport:
        rows = sort_summaries(fleet_summaries(snapshot.instances, policy, chosen), sort)
    else:
        if options.shard is not None:
            warn(options, "--shard %s: this judges only the shard's own instances; judge the whole fleet "
                          "on the shards' sum, in Prometheus (see the README)" % (options.shard,))
        rows = flag_services(fleet_summaries(snapshot.instances, policy), policy)
    remember_services(whole.instances, options)
    partial = strict and not all(i.readable for i in whole.instances)
    code = EXIT_FLAGGED if kind is FlaggedReport and rows else EXIT_PARTIAL if partial else EXIT_OK
    return kind(rows[::-1] if reverse else rows, snapshot, policy, options.shard, chosen), code


# track: a live view of one service or of the whole fleet (state, polling, views) ------------------


class TrackSettings(NamedTuple):
    """What track was asked for: one service (None: the whole fleet) and its schedule."""
    service: Optional[str] = None
    interval: float = DEFAULT_INTERVAL
    samples: Optional[int] = None  # -c: stop after so many
    rediscover: float = DEFAULT_REDISCOVER

    def sample_deadline(self, deadline: Optional[float]) -> float:
        """Seconds for a sample's /servers, then again its reads: --deadline, else the interval (at
        least 1 s): the schedule matters more than one slow instance."""
        return deadline if deadline is not None else max(self.interval, 1.0)

    def full_read_deadline(self, deadline: Optional[float]) -> float:
        """A read of the whole fleet (the first, each rediscovery) gets a whole command's time."""
        return max(DEFAULT_DEADLINE, self.sample_deadline(deadline))


NOT_READ: Any = object()  # the membership of an instance that never answered: any service's


class Membership:
    """The service of each listed instance, as its answers said: a name; None, answered without a
    valid one ("(unknown)"); NOT_READ until it answers (a body that is not JSON is no answer)."""
    # Never answered: read again 1, 2, 4... RETRY_CAP samples later (hanging ones would stall each sample).
    RETRY_CAP = 32

    def __init__(self) -> None:
        self.services: Dict[str, Any] = {}  # ip -> name, None or NOT_READ, in listed order
        self.samples = 0  # choices made: one per sample
        self.retry: Dict[str, Tuple[int, int]] = {}  # never answered: (failed reads, sample due)

    def forget(self, listed: Sequence[str]) -> List[str]:
        """Follow /servers: forget (and return) the instances gone; new ones are NOT_READ."""
        still = set(listed)
        left = [ip for ip in self.services if ip not in still]
        for ip in left:
            del self.services[ip]
            self.retry.pop(ip, None)
        for ip in listed:
            self.services.setdefault(ip, NOT_READ)
        return left

    def choose(self, service: Optional[str], full: bool, eager: bool = False) -> List[str]:
        """What a sample (one call) reads: all when full or service is None, else the service's members
        and the never-answered ones when due (all of them when eager)."""
        self.samples += 1
        if full or service is None:
            return list(self.services)
        return [ip for ip, known in self.services.items() if known == service or (
            known is NOT_READ and (eager or self.retry.get(ip, (0, 0))[1] <= self.samples))]

    def learn(self, readings: Iterable[Instance]) -> None:
        """Take what readings said: a service named; "(unknown)" for an answer without; a failure: nothing."""
        for reading in readings:
            if reading.ip not in self.services:
                continue  # forgotten while it was being read
            if reading.service is not None:
                self.services[reading.ip] = reading.service
            elif reading.answered and self.services[reading.ip] is NOT_READ:
                self.services[reading.ip] = None
            elif self.services[reading.ip] is NOT_READ:
                failed = self.retry.get(reading.ip, (0, 0))[0] + 1
                self.retry[reading.ip] = (failed, self.samples + min(self.RETRY_CAP, 2 ** (failed - 1)))
            if self.services[reading.ip] is not NOT_READ:
                self.retry.pop(reading.ip, None)

    def attribute(self, readings: Iterable[Instance]) -> List[Instance]:
        """Readings with their service: one that failed keeps its instance's last known service."""
        known = {ip: name for ip, name in self.services.items() if isinstance(name, str)}
        return [r if r.service is not None else r._replace(service=known.get(r.ip)) for r in readings]

    def known_services(self) -> List[str]:
        return sorted({known for known in self.services.values() if isinstance(known, str)})

    def unknown_count(self, answered: bool = True) -> int:
        """Instances whose service is not known: never answered, or (if answered) answered without one."""
        return sum(1 for known in self.services.values() if known is NOT_READ or answered and known is None)


class SessionTrend:
    """A session's values in at most `size` buckets [sum, values, samples]; when full, neighbours merge."""
    BUCKETS = 32  # characters of the session summary's sparklines

    def __init__(self, size: int = BUCKETS):
        self.size = size
        self.per_bucket = 1
        self.buckets: List[List[float]] = []

    def add(self, value: Optional[float]) -> None:
        if not self.buckets or self.buckets[-1][2] >= self.per_bucket:
            if len(self.buckets) >= self.size:
                self.buckets = [[a + b for a, b in zip(first, second)]
                                for first, second in zip(self.buckets[0::2], self.buckets[1::2])]
                self.per_bucket *= 2
            self.buckets.append([0.0, 0, 0])
        bucket = self.buckets[-1]
        bucket[2] += 1
        if value is not None:
            bucket[0] += value
            bucket[1] += 1

    def values(self) -> List[Optional[float]]:
        return [total / count if count else None for total, count, _ in self.buckets]


class Series:
    """One value across a session, in constant memory: recent samples, min/avg/max, trend; None a gap."""
    WINDOW = 20  # characters of the live sparklines

    def __init__(self) -> None:
        from collections import deque
        self.recent: Any = deque(maxlen=self.WINDOW)
        self.trend = SessionTrend()
        self.count, self.total, self.minimum, self.maximum = 0, 0.0, float("inf"), float("-inf")

    def add(self, value: Optional[float]) -> None:
        self.recent.append(value)
        self.trend.add(value)
        if value is not None:
            self.count += 1
            self.total += value
            self.minimum = min(self.minimum, value)
            self.maximum = max(self.maximum, value)

    @property
    def mean(self) -> Optional[float]:
        return self.total / self.count if self.count else None


class InstanceTrack:
    """A row of `track SERVICE`: one instance across the session."""
    def __init__(self, ip: str, policy: Policy):
        self.key = ip
        self.policy = policy
        self.order = ip_sort_key(ip)  # parsed once: rows are sorted several times a sample
        self.last: Optional[Instance] = None
        self.cpu, self.memory = Series(), Series()
        self.samples = self.unhealthy = 0
        self.gone = False

    def add(self, reading: Optional[Instance]) -> None:
        """One sample: a reading, or None when CPX could not be reached (a gap)."""
        usable = reading if reading is not None and reading.readable else None
        self.cpu.add(usable.cpu if usable else None)
        self.memory.add(usable.memory if usable else None)
        if reading is not None:
            self.last = reading
            self.samples += 1
            self.unhealthy += instance_status(reading, self.policy) == UNHEALTHY

    def status(self) -> str:
        return GONE if self.gone else UNKNOWN if self.last is None else instance_status(self.last, self.policy)

    def counts(self) -> Tuple[int, int]:
        """(healthy, instances) now: for the worst moment."""
        return int(self.status() == HEALTHY), 0 if self.gone else 1


class ServiceTrack:
    """A row of the whole-fleet view: one service (None: the "(unknown)" group) across the session."""
    def __init__(self, service: Optional[str], policy: Policy):
        self.key = service
        self.policy = policy  # the minimum of healthy instances
        self.last: Optional[ServiceSummary] = None
        self.healthy_share = Series()  # percent of its instances healthy: the sparkline
        self.healthy = Series()  # healthy instances: the summary's min/avg/max
        self.cpu, self.memory = Series(), Series()  # average cpu and memory
        self.samples = self.flagged = 0  # flagged: samples under the policy's minimum, or missing
        self.gone = False

    def add(self, summary: Optional[ServiceSummary]) -> None:
        share = 100.0 * summary.healthy / summary.instances if summary and summary.instances else None
        self.healthy_share.add(share)
        self.cpu.add(summary.avg_cpu if summary else None)
        self.memory.add(summary.avg_memory if summary else None)
        if summary is not None:
            self.healthy.add(summary.healthy)
            self.last = summary
            self.samples += 1
            self.flagged += self.under_minimum(summary)

    def under_minimum(self, summary: ServiceSummary) -> bool:
        return bool(flag_services([summary], self.policy))

    def rank(self) -> Tuple:
        """Worst first: services flagged, then by share healthy; gone ones last."""
        if self.gone or self.last is None:
            return (2, 0.0, service_sort_key(self.key))
        last = self.last
        return (int(not self.under_minimum(last)), last.healthy / max(1, last.instances),
                service_sort_key(self.key))

    def counts(self) -> Tuple[int, int]:
        return (0, 0) if self.gone or self.last is None else (self.last.healthy, self.last.instances)


class Sample(NamedTuple):
    """One sample as read: its rows by key, in display order, or why CPX was unreachable."""
    moment: str
    values: Dict[Any, Any]
    outage: Optional[str] = None
    seconds: float = 0.0  # how long it took
    note: Optional[str] = None  # what the view says above the table (a service not found yet)


class WorstMoment(NamedTuple):
    """The sample with the fewest healthy instances."""
    healthy: int
    instances: int
    moment: str
    sample: int


class TrackState:
    """Everything track knows of a session: a row track per key, counters, and the worst moment."""
    def __init__(self, scope: Any, interval: float):
        self.scope = scope
        self.interval = interval
        self.rows: Dict[Any, Any] = {}
        self.samples = self.unreachable = 0
        self.skipped = 0  # slots that began while a sample was still running
        self.late = 0  # samples that took longer than the interval
        self.first_time: Optional[str] = None
        self.last_good_time: Optional[str] = None
        self.last = Sample("", {})  # the last sample taken
        self.gone: List[Any] = []  # keys that left in the last sample
        self.worst: Optional[WorstMoment] = None

    @property
    def last_was_late(self) -> bool:
        """The last sample took longer than the interval (the first, a full read, never counts)."""
        return self.samples > 1 and self.last.seconds > self.interval

    def tracks(self) -> List[Any]:
        return self.scope.order(list(self.rows.values()))

    def present(self) -> List[Any]:
        return [t for t in self.tracks() if not t.gone]

    def record(self, sample: Sample) -> None:
        """Take one sample."""
        self.samples += 1
        self.first_time = self.first_time or sample.moment
        self.last = sample
        self.late += self.last_was_late
        self.gone = []
        if sample.outage is not None:
            self.unreachable += 1
            for track in self.present():
                track.add(None)
            return
        self.last_good_time = sample.moment
        self.gone = [key for key, track in self.rows.items() if not track.gone and key not in sample.values]
        for key in self.gone:
            self.rows[key].gone = True
        for key, value in sample.values.items():
            track = self.rows[key] = self.rows.get(key) or self.scope.new_track(key)
            track.gone = False
            track.add(value)
        self._note_worst()

    def _note_worst(self) -> None:
        counts = [t.counts() for t in self.present()]
        healthy = sum(h for h, _ in counts)
        if counts and (self.worst is None or healthy < self.worst.healthy):
            self.worst = WorstMoment(healthy, sum(n for _, n in counts), self.last.moment, self.samples)


def spark_blocks(stream: Any) -> str:
    """Block characters when the stream's encoding can show them, else an ASCII ramp."""
    try:
        SPARK_BLOCKS.encode(getattr(stream, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return SPARK_ASCII
    return SPARK_BLOCKS


def sparkline(values: Iterable[Optional[float]], blocks: str) -> str:
    """Percentages on a fixed 0-100 scale, one character each; a space where unknown."""
    top = len(blocks) - 1
    return "".join(" " if v is None else blocks[min(top, int(v * len(blocks) / 100.0))] for v in values)


def _min_avg_max(stats: Series, unit: str = "%", threshold: Optional[float] = None) -> str:
    if not stats.count:
        return "-"

    def short(value: float) -> str:
        text = shown_percent(value, 1, threshold) if unit == "%" else "%.1f" % value
        return text[:-2] if text.endswith(".0") else text
    return "%s/%s/%s%s" % (short(stats.minimum), short(stats.mean or 0.0), short(stats.maximum), unit)


def fit_table(columns: Sequence[Column], rows: List[Dict[Column, str]], drop: Sequence[Column],
              width: Optional[int], styles: Sequence[Optional[str]], color: bool) -> str:
    """The columns that fit `width` (None: all), dropping `drop`'s in order, then the first's cells cut."""
    kept = list(columns)
    widths = {c: max([display_width(c.title)] + [display_width(row[c]) for row in rows]) for c in columns}

    def total() -> int:
        return 1 + sum(3 + widths[c] for c in kept)

    for column in drop:
        if width is None or total() <= width:
            break
        kept.remove(column)
    if width is not None and total() > width:
        room = max(display_width(kept[0].title), widths[kept[0]] - (total() - width))
        for row in rows:
            row[kept[0]] = clip(row[kept[0]], room)
    return render_table(kept, [[cells[c] for c in kept] for cells in rows], styles, color)


def _fit_rows(tracks: List[Any], max_rows: Optional[int], worst_first: Any, noun: str) -> Tuple[List, str]:
    """The worst rows that fit max_rows (a line kept to count the rest), in order; and that line, if any."""
    if max_rows is None or len(tracks) <= max_rows:
        return tracks, ""
    kept = {id(t) for t in sorted(tracks, key=worst_first)[:max(1, max_rows - 1)]}
    shown = [t for t in tracks if id(t) in kept]
    return shown, "%s not shown (the worst are shown first; a taller terminal shows all)\n" % _plural(
        len(tracks) - len(shown), noun)


class ServiceScope:
    """`track SERVICE`: a row per instance of one service, found by name (exact, then any case)."""
    FIELDS = ("time", "ip", "service", "status", "cpu", "memory")
    CPU_TREND, MEMORY_TREND = Column("CPU trend"), Column("Memory trend")
    COLUMNS = (IP, STATUS, CPU, CPU_TREND, MEMORY, MEMORY_TREND)
    DROP = (MEMORY_TREND, CPU_TREND)  # what a narrow terminal loses first
    SUMMARY_COLUMNS = (IP, Column("Samples", True), Column("CPU min/avg/max", True),
                       Column("Memory min/avg/max", True), Column("Unhealthy", True), CPU_TREND, MEMORY_TREND)

    def __init__(self, name: str, policy: Policy):
        self.name = name
        self.policy = policy
        self.service: Optional[str] = None  # the name as CPX spells it, once an instance said it

    @property
    def title(self) -> str:
        return sanitize(self.service or self.name)

    def new_track(self, ip: str) -> InstanceTrack:
        return InstanceTrack(ip, self.policy)

    def to_read(self, membership: Membership, full: bool) -> List[str]:
        """Its members, and the instances that never answered; the whole fleet when full."""
        return membership.choose(self.service or self.name, full, eager=self.service is None)

    def resolve(self, membership: Membership, first: bool) -> None:
        """Learn which service the name means (at the first sample, one matching nothing is a typo)."""
        if self.service is not None:
            return
        try:
            self.service = resolve_service(self.name, membership.known_services(), membership.unknown_count())
        except ServiceUnreadable:
            pass  # the note says so, every sample, until one answers
        except UsageError:
            if first:
                raise

    def not_found(self, membership: Membership) -> Optional[str]:
        """Why the service is not shown yet, or None once it is."""
        if self.service is not None:
            return None
        unknown = membership.unknown_count()
        if not unknown:
            return "no instance of %r in the fleet now" % sanitize(self.name)
        return "no readable instance of %r; %s could not be read, it may be among them" % (
            sanitize(self.name), _plural(unknown, "instance"))

    def finish(self, membership: Membership) -> None:
        """At the end: a service never found in the whole session is an error a script must see."""
        if self.service is None:
            resolve_service(self.name, membership.known_services(), membership.unknown_count())

    def values(self, membership: Membership, readings: Sequence[Instance]) -> Dict[Any, Any]:
        ours = [r for r in membership.attribute(readings) if self.service and r.service == self.service]
        return {r.ip: r for r in sorted(ours, key=lambda r: ip_sort_key(r.ip))}

    def note(self, membership: Membership) -> Optional[str]:
        """A line above the table: the service not found yet, or instances not read yet."""
        waiting = membership.unknown_count(answered=False)
        if self.service is not None and waiting:  # found: not_found() says nothing
            return "%s not read yet: read again in later samples" % _plural(waiting, "instance")
        return self.not_found(membership)

    def order(self, tracks: List[InstanceTrack]) -> List[InstanceTrack]:
        return sorted(tracks, key=lambda t: t.order)

    def subject(self, state: TrackState) -> str:
        return "%s  %s" % (self.title, _plural(len(state.present()), "instance"))

    def table(self, state: TrackState, blocks: str, color: bool, max_rows: Optional[int] = None,
              width: Optional[int] = None) -> str:
        """The instances as `services` shows them, with trends; when cut to max_rows, the worst."""
        tracks, left_out = _fit_rows(state.tracks(), max_rows, lambda t: _STATUS_RANK.get(t.status(), 3),
                                     "more instance")
        readings = [t.last if t.status() in (HEALTHY, UNHEALTHY) else Instance(t.key) for t in tracks]
        rows, styles = instance_cells(readings, self.policy), []
        for track, cells in zip(tracks, rows):
            cells[self.CPU_TREND], cells[self.MEMORY_TREND] = (sparkline(track.cpu.recent, blocks),
                                                               sparkline(track.memory.recent, blocks))
            if track.gone or track.last is None:
                cells[STATUS], style = track.status(), "stale"
            elif state.last.outage is not None:
                cells[STATUS], style = status_label(track.last, self.policy) + " (stale)", "stale"
            else:
                cells[STATUS], style = status_label(track.last, self.policy), track.status()
            styles.append(style)
        return fit_table(self.COLUMNS, rows, self.DROP, width, styles, color) + left_out

    def summary_table(self, state: TrackState, blocks: str) -> str:
        cpu, memory = self.policy.limits(self.service)
        rows = [[sanitize(t.key) + (" (gone)" if t.gone else ""), str(t.samples),
                 _min_avg_max(t.cpu, "%", cpu), _min_avg_max(t.memory, "%", memory), str(t.unhealthy),
                 sparkline(t.cpu.trend.values(), blocks), sparkline(t.memory.trend.values(), blocks)]
                for t in state.tracks()]
        return render_table(self.SUMMARY_COLUMNS, rows)

    def records(self, state: TrackState) -> List[Dict[str, Any]]:
        """The last sample as json/csv records: its instances, then those gone."""
        records = [dict(time=state.last.moment, **instance_record(reading, self.policy))
                   for reading in state.last.values.values()]
        for record in records:
            del record["error"]
        return records + [{"time": state.last.moment, "ip": ip, "service": self.service, "status": GONE,
                           "cpu": None, "memory": None} for ip in state.gone]


class FleetScope:
    """`track` with no SERVICE (or --all): a row per service (missing ones too), worst first."""
    FIELDS = ("time", "service", "instances", "healthy", "avg_cpu", "max_cpu", "avg_memory", "max_memory")
    HEALTHY_TREND, CPU_TREND = Column("Healthy trend"), Column("CPU trend")
    COLUMNS = (SERVICE, INSTANCES, HEALTHY_COUNT, HEALTHY_TREND, AVG_CPU, MAX_CPU, CPU_TREND, AVG_MEMORY,
               MAX_MEMORY)
    DROP = (CPU_TREND, AVG_CPU, AVG_MEMORY, HEALTHY_TREND)  # what a narrow terminal loses first
    SUMMARY_COLUMNS = (SERVICE, Column("Samples", True), Column("Healthy min/avg/max", True),
                       Column("Avg CPU min/avg/max", True), Column("Avg Memory min/avg/max", True),
                       Column("Under minimum", True), HEALTHY_TREND, CPU_TREND)
    title = "fleet"

    def __init__(self, policy: Policy):
        self.policy = policy

    def new_track(self, service: Optional[str]) -> ServiceTrack:
        return ServiceTrack(service, self.policy)

    def to_read(self, membership: Membership, full: bool) -> List[str]:
        return membership.choose(None, True)

    def resolve(self, membership: Membership, first: bool) -> None:
        """Nothing to find: every service is shown."""

    def not_found(self, membership: Membership) -> Optional[str]:
        return None

    def finish(self, membership: Membership) -> None:
        """Nothing to check."""

    def values(self, membership: Membership, readings: Sequence[Instance]) -> Dict[Any, Any]:
        return {s.service: s for s in fleet_summaries(membership.attribute(readings), self.policy)}

    def note(self, membership: Membership) -> Optional[str]:
        return None

    def order(self, tracks: List[ServiceTrack]) -> List[ServiceTrack]:
        return sorted(tracks, key=ServiceTrack.rank)

    def subject(self, state: TrackState) -> str:
        present = state.present()
        return "fleet  %s in %s" % (_plural(sum(t.counts()[1] for t in present), "instance"),
                                    _plural(sum(1 for t in present if t.key is not None), "service"))

    def table(self, state: TrackState, blocks: str, color: bool, max_rows: Optional[int] = None,
              width: Optional[int] = None) -> str:
        tracks, left_out = _fit_rows(state.tracks(), max_rows, ServiceTrack.rank, "more service")
        lasts = [ServiceSummary(t.key, 0, 0) if t.gone or t.last is None else t.last for t in tracks]
        rows, styles = summary_cells(lasts, self.policy), []
        for track, last, cells in zip(tracks, lasts, rows):
            cells[self.HEALTHY_TREND] = sparkline(track.healthy_share.recent, blocks)
            cells[self.CPU_TREND] = sparkline(track.cpu.recent, blocks)
            if track.gone or track.last is None:
                cells[SERVICE] = service_label(track.key) + " (gone)"
                cells[INSTANCES] = cells[HEALTHY_COUNT] = "-"
            elif track.under_minimum(last):
                cells[HEALTHY_COUNT] += "!"
            styles.append(self._style(track, state))
        return fit_table(self.COLUMNS, rows, self.DROP, width, styles, color) + left_out

    @staticmethod
    def _style(track: ServiceTrack, state: TrackState) -> Optional[str]:
        if track.gone or track.last is None or state.last.outage is not None:
            return "stale"
        return UNHEALTHY if track.under_minimum(track.last) else UNKNOWN if track.key is None else None

    def summary_table(self, state: TrackState, blocks: str) -> str:
        rows = [[service_label(t.key) + (" (gone)" if t.gone else "" if t.last and t.last.instances else " (missing)"),
                 str(t.samples), _min_avg_max(t.healthy, ""),
                 _min_avg_max(t.cpu, "%", self.policy.limits(t.key)[0]),
                 _min_avg_max(t.memory, "%", self.policy.limits(t.key)[1]), str(t.flagged),
                 sparkline(t.healthy_share.trend.values(), blocks), sparkline(t.cpu.trend.values(), blocks)]
                for t in state.tracks()]
        return render_table(self.SUMMARY_COLUMNS, rows)

    def records(self, state: TrackState) -> List[Dict[str, Any]]:
        """The last sample as json/csv records: a service each, then those gone (0 instances)."""
        summaries = [*state.last.values.values(), *(ServiceSummary(service, 0, 0) for service in state.gone)]
        records = [dict(summary_record(s, self.policy), time=state.last.moment) for s in summaries]
        return [{name: record[name] for name in self.FIELDS} for record in records]


def poll(client: Any, membership: Membership, scope: Any, full: bool, seconds: float,
         first: bool = False, clock: Any = time) -> Sample:
    """One sample: /servers, then what the scope reads, each within `seconds`; an outage when neither
    answered (CpxUnavailable for the first). clock times it; deadlines are real time."""
    moment, started, deadline = utc_now(), clock.monotonic(), time.monotonic() + seconds
    listing_error = None
    try:
        membership.forget(list_fleet(client, client.options, deadline) if first else
                          client.list_servers(deadline).ips)
    except CpxUnavailable as error:
        if first:
            raise
        listing_error = str(error)
    readings = client.read_instances(scope.to_read(membership, full), time.monotonic() + seconds)
    membership.learn(readings)
    if listing_error is not None and not any(r.readable for r in readings):
        return Sample(moment, {}, listing_error, clock.monotonic() - started)
    scope.resolve(membership, first)
    return Sample(moment, scope.values(membership, readings), None, clock.monotonic() - started,
                  scope.note(membership))


class Schedule:
    """Sample k at start + k x interval; a slot missed by a long sample is skipped, never made up."""
    def __init__(self, interval: float, start: float, rediscover: float = float("inf")):
        self.interval = interval
        self.start = start
        self.slot = 0
        self.rediscover = rediscover
        self.last_full_read = start

    def next_wait(self, now: float) -> Tuple[float, int]:
        """Seconds until the next slot, and how many slots were missed to reach it."""
        next_slot = self.slot + 1
        missed = 0
        if now > self.start + next_slot * self.interval:
            latest = int((now - self.start) // self.interval)  # the slot that began last
            missed = latest - self.slot
            next_slot = latest + 1
        self.slot = next_slot
        return max(0.0, self.start + next_slot * self.interval - now), missed

    def full_read_due(self, now: float) -> bool:
        """Whether the sample starting now re-reads the whole fleet (every `rediscover` seconds)."""
        if now - self.last_full_read < self.rediscover:
            return False
        self.last_full_read = now
        return True


def render_track_header(state: TrackState) -> str:
    """One line: what is watched, the time (UTC), the sample, the interval (or a late sample's time)."""
    line = "%s  %sZ  sample %d  " % (state.scope.subject(state), state.last.moment[11:19], state.samples)
    late = "interval %gs, sample took %.1fs" % (state.interval, state.last.seconds)
    line += late if state.last_was_late else "every %gs" % state.interval
    return line + ("  %s skipped" % _plural(state.skipped, "slot") if state.skipped else "")


def render_outage(state: TrackState) -> str:
    """Why the last sample could not reach CPX, and how old the values shown are."""
    since = " (values from %s)" % state.last_good_time if state.last_good_time else ""
    return "CPX unreachable at %s: %s; keeping the last known values%s" % (
        state.last.moment, state.last.outage, since)


def render_track_summary(state: TrackState, blocks: str) -> str:
    """The end-of-session summary, like ping's: per row, then the worst moment."""
    lines = ["--- %s: %s from %s to %s, %d over the interval, %s skipped, %d unreachable ---" % (
        state.scope.title, _plural(state.samples, "sample"), state.first_time, state.last.moment, state.late,
        _plural(state.skipped, "slot"), state.unreachable), state.scope.summary_table(state, blocks).rstrip("\n")]
    worst = state.worst
    if worst is not None and worst.instances:
        lines.append("worst moment: %d of %s healthy at %s (sample %d)" % (
            worst.healthy, _plural(worst.instances, "instance"), worst.moment, worst.sample))
    elif worst is not None:
        lines.append("worst moment: no instance present at %s (sample %d)" % (worst.moment, worst.sample))
    return "\n".join(lines) + "\n"


class Keyboard:
    """`q` stops the live view, as in top: only when stdin is a terminal and we are in its
    foreground (else SIGTTOU stops us); without termios (Windows), Ctrl+C only."""
    def __init__(self, stream: Any):
        self.stream = stream
        self.saved: Any = None  # the terminal's modes, to give back

    def open(self) -> None:
        """Take keys one at a time, when stdin is our terminal."""
        try:
            import termios
            import tty
        except ImportError:  # not a Unix: Ctrl+C only
            return
        try:
            descriptor = self.stream.fileno()
            if os.isatty(descriptor) and os.tcgetpgrp(descriptor) == os.getpgrp():
                self.saved = termios.tcgetattr(descriptor)
                tty.setcbreak(descriptor, termios.TCSANOW)
        except (OSError, ValueError, AttributeError, termios.error):
            self.saved = None

    def wait(self, seconds: float, clock: Any = time) -> bool:
        """Sleep for seconds, or until q; True when q was pressed."""
        import select
        if self.saved is None:
            clock.sleep(seconds)
            return False
        end = time.monotonic() + seconds
        descriptor = self.stream.fileno()
        while time.monotonic() < end:
            if not select.select([descriptor], [], [], max(0.0, end - time.monotonic()))[0]:
                continue
            keys = os.read(descriptor, 64)
            if not keys:  # end of input: nothing more to read, sleep the rest
                time.sleep(max(0.0, end - time.monotonic()))
                return False
            if b"q" in keys.lower():
                return True
        return False

    def close(self) -> None:
        """Give the terminal its modes back."""
        if self.saved is None:
            return
        import termios
        with contextlib.suppress(OSError, ValueError, termios.error):
            termios.tcsetattr(self.stream.fileno(), termios.TCSADRAIN, self.saved)
        self.saved = None


class LogView:
    """Where track's samples go: each appended as a block (header, table, outage line); see its subclasses."""
    def __init__(self, options: Options, settings: TrackSettings):
        self.options = options
        self.settings = settings
        self.keyboard = Keyboard(sys.stdin)
        self.blocks = spark_blocks(sys.stdout)

    def open(self) -> None:
        """Get ready for the first sample."""

    def show(self, state: TrackState) -> None:
        """Show one sample."""
        table = state.scope.table(state, self.blocks, self.options.color)
        outage = [render_outage(state)] if state.last.outage is not None else []
        lines = [render_track_header(state)] + self.note(state) + [table.rstrip("\n")] + outage
        emit("\n".join(lines) + "\n\n")

    def note(self, state: TrackState, width: Optional[int] = None) -> List[str]:
        """The sample's note (instances not read yet, say), painted, as 0 or 1 line."""
        return [paint(clip(state.last.note, width), UNKNOWN, self.options.color)] if state.last.note else []

    def close(self, state: TrackState) -> None:
        """End the view: the session's summary."""
        emit(render_track_summary(state, self.blocks))


class ScreenView(LogView):
    """The terminal's alternate screen, redrawn in place to its size; q quits."""
    # Alternate screen, cursor hidden, no auto-wrap (a wide line is clipped: the frame never scrolls).
    ENTER = "\x1b[?1049h\x1b[?25l\x1b[?7l"
    LEAVE = "\x1b[?7h\x1b[?25h\x1b[?1049l"  # all that back: the screen the user had
    entered = False

    def open(self) -> None:
        """Take over the screen and the keyboard; on Ctrl+Z, give them back while stopped."""
        emit(self.ENTER)
        self.entered = True
        self.keyboard.open()
        if getattr(signal, "SIGTSTP", None) and signal.getsignal(signal.SIGTSTP) == signal.SIG_DFL:
            signal.signal(signal.SIGTSTP, self.suspend)

    def suspend(self, signum: int, frame: Any) -> None:
        """Ctrl+Z: the user's screen and terminal modes back, stop; when continued, the view again."""
        self.keyboard.close()
        emit(self.LEAVE)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # stopped here until `fg` (or `bg`) continues it
        signal.signal(signum, self.suspend)
        emit(self.ENTER)
        self.keyboard.open()

    def footer(self, state: TrackState, width: int) -> str:
        if state.last.outage is not None:
            return paint(clip(render_outage(state), width), UNHEALTHY, self.options.color)
        if self.settings.samples is not None:
            return "stops after %s" % _plural(self.settings.samples, "sample")
        return "%s to stop" % ("q or Ctrl+C" if self.keyboard.saved is not None else "Ctrl+C")

    def show(self, state: TrackState) -> None:
        import shutil
        size = shutil.get_terminal_size((80, 24))
        note = self.note(state, size.columns)
        # Header, (note,) blank, two table heading lines, blank, footer: 6 or 7 lines around the rows.
        table = state.scope.table(state, self.blocks, self.options.color, max(1, size.lines - 6 - len(note)),
                                  size.columns)
        lines = ([clip(render_track_header(state), size.columns)] + note + [""] + table.splitlines()
                 + ["", self.footer(state, size.columns)])
        # No newline after the last line: on the bottom row it would scroll the screen.
        emit("\x1b[H" + "\x1b[K\n".join(lines) + "\x1b[K\x1b[J")

    def close(self, state: TrackState) -> None:
        """Give the screen and keyboard back (whatever ended the view), then the summary."""
        if getattr(signal, "SIGTSTP", None) and signal.getsignal(signal.SIGTSTP) == self.suspend:
            signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        self.keyboard.close()
        if self.entered:
            emit(self.LEAVE)
            self.entered = False
        super().close(state)


class RecordsView(LogView):
    """JSON Lines or csv records on stdout; outages and the summary on stderr (stdout stays data)."""
    def show(self, state: TrackState) -> None:
        import json
        if state.last.outage is not None:
            warn(self.options, render_outage(state))
        elif self.options.output == "json":
            emit("".join(json.dumps(record) + "\n" for record in state.scope.records(state)))
        else:
            header = state.samples == 1 and self.options.headers
            emit(render_csv(state.scope.FIELDS, state.scope.records(state), header))

    def close(self, state: TrackState) -> None:
        say(render_track_summary(state, spark_blocks(sys.stderr)).rstrip("\n"))


def first_sample(client: Any, membership: Membership, scope: Any, options: Options, settings: TrackSettings,
                 clock: Any) -> Sample:
    """The first sample, a full read, timed at its end: the schedule starts there (no slot skipped)."""
    sample = poll(client, membership, scope, True, settings.full_read_deadline(options.deadline), True, clock)
    missing = scope.not_found(membership)
    if missing:
        warn(options, "%s; reading them again every sample" % missing)
    return sample._replace(moment=utc_now())


def track_view(options: Options, settings: TrackSettings) -> LogView:
    """RecordsView for json and csv; else ScreenView on an interactive terminal, else LogView."""
    cls = RecordsView if options.output in ("json", "csv") else ScreenView if options.interactive else LogView
    return cls(options, settings)


def cmd_track(client: Any, options: Options, settings: TrackSettings, clock: Any = time) -> int:
    """Sample a service or the fleet on a schedule (clock's) until q, Ctrl+C or --count; summarize."""
    if options.output not in ("table", "wide", "json", "csv") or options.write is not None:
        raise UsageError("track streams: -o prometheus and --write are for services, status and unhealthy")
    scope = FleetScope(options.policy) if settings.service is None else ServiceScope(settings.service,
                                                                                     options.policy)
    membership = Membership()
    sample = first_sample(client, membership, scope, options, settings, clock)
    state = TrackState(scope, settings.interval)
    view = track_view(options, settings)
    schedule = Schedule(settings.interval, clock.monotonic(), settings.rediscover)
    code = EXIT_OK
    try:
        view.open()
        while True:
            state.record(sample)
            view.show(state)
            if settings.samples is not None and state.samples >= settings.samples:
                break
            wait, missed = schedule.next_wait(clock.monotonic())
            state.skipped += missed
            if view.keyboard.wait(wait, clock):
                break  # q
            full = schedule.full_read_due(clock.monotonic())
            deadline = settings.full_read_deadline if full else settings.sample_deadline
            sample = poll(client, membership, scope, full, deadline(options.deadline), clock=clock)
    except KeyboardInterrupt:
        pass  # Ctrl+C is how a live view is stopped: a normal end
    except Terminated:
        code = EXIT_TERMINATED
    finally:
        view.close(state)
    if code == EXIT_OK:
        scope.finish(membership)
    return code


# serve: a Prometheus exporter that reads the fleet at scrape time ---------------------------------

SERVE_PORT = 9968  # in the exporters' 9100-9999, which Prometheus's port list has filled: --listen moves it
# Connections served at once, a thread each (one idle for REQUEST_SECONDS at most); more: refused, not queued.
SERVE_CONNECTIONS = 64
REQUEST_SECONDS = 5.0  # a client has this long to send its request, however it trickles
SCRAPE_MARGIN = 0.5  # seconds kept from Prometheus's scrape timeout, to answer in (as blackbox_exporter)
MIN_SCRAPE_DEADLINE = 0.1
LANDING_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>cpx_devops exporter</title></head>
<body><h1>cpx_devops exporter</h1><p>The health of a CPX fleet, read at each scrape:
<a href="/metrics">/metrics</a>. Health: <a href="/-/healthy">/-/healthy</a>.</p></body></html>\n"""
PAGES = {"/": (LANDING_PAGE, "text/html"), "/-/healthy": ("OK\n", "text/plain")}  # serve's, but /metrics


class ServeSettings(NamedTuple):
    """What serve was asked: where to listen, and how long a read may serve later scrapes."""
    host: str = "127.0.0.1"
    port: int = SERVE_PORT
    min_interval: float = 0.0  # 0: every scrape reads the fleet (or shares the read in flight)


class Exporter:
    """serve's reads of the fleet: one at a time, shared by the scrapes that come meanwhile, a good one kept
    for --min-interval from its start; a failed one never (a scrape that shared it retries if it has time)."""
    def __init__(self, options: Options, settings: ServeSettings):
        self.settings = settings
        self.client = CpxClient(options)
        self.lock = threading.Lock()
        self.in_flight: Optional[threading.Event] = None  # set when the read in flight is done
        self.started = float("-inf")  # when the last read began
        self.result: Tuple[int, str] = (503, "no read yet\n")  # the last read's status and body

    def scrape(self, timeout: Optional[float]) -> Tuple[int, str]:
        """(HTTP status, body) of a read, within the scrape's timeout less a margin, at most --deadline."""
        seconds = self.client.options.deadline or DEFAULT_DEADLINE
        if timeout is not None:
            seconds = min(seconds, max(MIN_SCRAPE_DEADLINE, timeout - SCRAPE_MARGIN))
        deadline = time.monotonic() + seconds
        while True:
            with self.lock:
                done = self.in_flight
                kept = self.result[0] == 200 and time.monotonic() - self.started < self.settings.min_interval
                if done is None and not kept:
                    done = self.in_flight = threading.Event()
                    self.started = time.monotonic()
                    break  # this scrape reads
            if done is None:
                return self.result
            if not done.wait(max(0.0, deadline - time.monotonic()) + SCRAPE_MARGIN / 2):
                return 503, "the read of the fleet in flight did not end within this scrape's timeout\n"
            if self.result[0] == 200 or time.monotonic() >= deadline:
                return self.result
        try:
            self.result = self.read(deadline)
        except Exception as error:  # noqa: BLE001 (a bug: said; no good read kept in its place)
            self.result = 500, "internal error: %s: %s\n" % (type(error).__name__, sanitize(error))
            say("%s: internal error in a read: %r" % (program_name(), error))
        finally:
            with self.lock:
                self.in_flight = None
            done.set()
        return self.result

    def read(self, deadline: float) -> Tuple[int, str]:
        try:
            report, _ = snapshot_report(InstancesReport, self.client, self.client.options, deadline=deadline)
        except (CpxUnavailable, UsageError) as error:
            return 503, "%s: %s%s\n" % (program_name(), getattr(error, "prefix", ""), error)
        return 200, report.as_prometheus(self.client.options)


def _http_classes() -> Tuple[Any, Any]:
    """The HTTP server classes of serve and simulate, made on first use (http.server costs 20 ms)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    class QuietHandler(BaseHTTPRequestHandler):
        def answer(self, status: int, body: bytes, content_type: str = "application/json",
                   headers: Sequence[Tuple[str, str]] = ()) -> None:
            self.send_response(status)
            for header in (("Content-Type", content_type), *headers, ("Content-Length", str(len(body)))):
                self.send_header(*header)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a line per request would drown what matters

    class QuietServer(ThreadingHTTPServer):
        daemon_threads = True

        def __init__(self, address: Tuple[str, int], handler: Any):
            import socket
            self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
            super().__init__(address, handler)

        @property
        def url(self) -> str:
            host = str(self.server_address[0])
            return "http://%s:%d" % ("[%s]" % host if ":" in host else host, self.server_address[1])

        def handle_error(self, request: Any, client_address: Any) -> None:
            # A client hanging up (an OSError) is its business; anything else is our bug, and shown.
            if not isinstance(sys.exc_info()[1], OSError):
                super().handle_error(request, client_address)

    return QuietServer, QuietHandler


def listening(make: Callable[[], Any], settings: Any) -> Any:
    """A server made and serving in a background thread; UsageError when it cannot listen."""
    try:
        server = make()
    except OSError as error:
        raise UsageError("cannot listen on %s port %d: %s" % (settings.host, settings.port, error.strerror or error))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def serve_until_stopped(server: Any) -> NoReturn:
    """Serve until Ctrl+C or SIGTERM (which reach main() as for any command), then close."""
    try:
        while True:
            # Short: a signal another thread gets waits for this sleep to end (seen: SIGTERM unheard an hour).
            time.sleep(0.5)
    finally:
        server.shutdown()
        server.server_close()


def serve_exporter(options: Options, settings: ServeSettings) -> Any:
    """Start serve's HTTP server in a background thread; returns the server (see .url)."""
    QuietServer, QuietHandler = _http_classes()
    exporter = Exporter(options, settings)
    watchdog = Watchdog()  # cuts a client that has not sent its whole request in time

    class ExporterHandler(QuietHandler):  # type: ignore[valid-type,misc]
        server_version = "cpx_devops/" + __version__
        timeout = REQUEST_SECONDS  # any one read or write; HTTP/1.0: one request per connection

        def setup(self) -> None:
            super().setup()
            self.guard = watchdog.arm(time.monotonic() + REQUEST_SECONDS)
            self.guard.connected(self.connection, 0.0)

        def parse_request(self) -> bool:
            parsed = super().parse_request()  # the request line and headers: all a GET has
            watchdog.disarm(self.guard)
            return parsed

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                header = self.headers.get("X-Prometheus-Scrape-Timeout-Seconds") or ""
                seconds = float(header) if re.match(r"\s*(?:[0-9]+\.?[0-9]*|\.[0-9]+)\s*\Z", header) else 0.0
                status, body = exporter.scrape(seconds or None)  # absent, 0 or not a number: none
                self.text(status, body, "text/plain; version=0.0.4; charset=utf-8")
            else:
                page, kind = PAGES.get(path, ("not found: see /\n", "text/plain"))
                self.text(200 if path in PAGES else 404, page, kind + "; charset=utf-8")

        def text(self, status: int, text: str, content_type: str) -> None:
            body, headers = text.encode("utf-8"), [("Vary", "Accept-Encoding")]
            # gzip when accepted: named, and not with q=0 (a q of 0.001 is an acceptance).
            if re.search(r"(?:^|,)\s*gzip\s*(?:,|$|;\s*q=(?!0(?:\.0*)?\s*(?:,|$)))",
                         self.headers.get("Accept-Encoding", "").lower()):
                import gzip
                body, headers = gzip.compress(body, 6), headers + [("Content-Encoding", "gzip")]
            self.answer(status, body, content_type, headers)

        def refuse(self) -> None:
            self.answer(405, b"", "text/plain; charset=utf-8", [("Allow", "GET")])

        do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = refuse

    class ExporterServer(QuietServer):  # type: ignore[valid-type,misc]
        connections = threading.BoundedSemaphore(SERVE_CONNECTIONS)
        request_queue_size = SERVE_CONNECTIONS  # the listen backlog: accepted at once, or refused

        def process_request(self, request: Any, client_address: Any) -> None:
            if not self.connections.acquire(blocking=False):
                return super().shutdown_request(request)
            super().process_request(request, client_address)

        def shutdown_request(self, request: Any) -> None:
            super().shutdown_request(request)
            self.connections.release()

    return listening(lambda: ExporterServer((settings.host, settings.port), ExporterHandler), settings)


def cmd_serve(options: Options, settings: ServeSettings) -> int:
    """Serve /metrics until SIGTERM or Ctrl+C."""
    if options.output not in ("table", "prometheus") or options.write is not None:
        raise UsageError("serve answers in the Prometheus format: -o and --write are for the other commands")
    server = serve_exporter(options, settings)
    say("%s: serving %s/metrics (Ctrl+C to stop)" % (program_name(), server.url))
    return serve_until_stopped(server)


# The simulator: a CPX-compatible server on loopback -----------------------------------------------

SIMULATED_SERVICES = ("UserService", "TicketService", "PaymentService", "AuthService", "SearchService",
                      "InventoryService", "NotificationService", "ReportService", "GeoService", "MailService")
FAIL, HANG, SLOW = "fail", "hang", "slow"


def _splitmix64(state: int) -> Tuple[int, float]:
    """The next state and a uniform number in [0, 1): a tiny, seedable generator per instance."""
    state = (state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    mixed = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    mixed = ((mixed ^ (mixed >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return state, ((mixed ^ (mixed >> 31)) >> 11) / float(1 << 53)


class Sickness(NamedTuple):
    """Fractions of a simulated fleet (at least one instance when above 0) that fail, hang, or are slow."""
    fail_fraction: float = 0.0
    hang_fraction: float = 0.0
    slow_fraction: float = 0.0
    slow_ms: float = 0.0

    def counts(self, servers: int) -> Tuple[int, ...]:
        return tuple(max(1, int(f * servers + 0.5)) if f > 0 else 0 for f in self[:3])  # fail, hang, slow


class SimulatedInstance:
    """One simulated instance: its service, random walk, base, and generator's state."""
    __slots__ = ("service", "cpu", "memory", "base_cpu", "base_memory", "seed")

    def __init__(self, service: str, cpu: float, memory: float, seed: int):
        self.service, self.cpu, self.memory, self.base_cpu, self.base_memory, self.seed = (
            service, cpu, memory, cpu, memory, seed)


class SimulatedFleet:
    """Random cpu/memory walks, some sick; thread-safe; a generator per instance: seeded runs repeat."""
    def __init__(self, count: int, seed: Optional[int] = None, sickness: Sickness = Sickness()):  # noqa: B008
        import random
        rng = random.Random(seed)
        self.lock = threading.Lock()
        self.state: Dict[str, SimulatedInstance] = {}
        self.ips = ["10.58.%d.%d" % (1 + k // 254, 1 + k % 254) for k in range(count)]
        small = SIMULATED_SERVICES[-1]
        for index, ip in enumerate(self.ips):
            if count >= 20:  # the first two: a two-instance service, one of them hot, something to flag
                service = small if index in (0, 1) else rng.choice(SIMULATED_SERVICES[:-1])
            else:
                service = SIMULATED_SERVICES[index % len(SIMULATED_SERVICES)]
            hot = index == 0 or rng.random() < 0.04
            base_cpu = rng.uniform(93, 99) if hot else rng.uniform(5, 70)
            base_memory = rng.uniform(10, 80)
            self.state[ip] = SimulatedInstance(service, base_cpu, base_memory, rng.getrandbits(64))
        # A generator of its own, so that a sick fleet shows the same values as a healthy one.
        order = list(self.ips)
        random.Random(None if seed is None else "sick-%d" % seed).shuffle(order)
        kinds = [kind for kind, n in zip((FAIL, HANG, SLOW), sickness.counts(count)) for _ in range(n)]
        self.sick: Dict[str, str] = dict(zip(order, kinds))  # ip -> FAIL, HANG or SLOW

    def read(self, ip: str) -> Optional[Dict[str, str]]:
        """The next reading of an instance (the walk moves on every read), None if unknown."""
        with self.lock:
            entry = self.state.get(ip)
            if entry is None:
                return None
            noise = []
            for _ in range(4):
                entry.seed, uniform = _splitmix64(entry.seed)
                noise.append(uniform)
            # Two roughly normal steps (sums of two uniforms), pulled back towards the base.
            entry.cpu = min(100.0, max(0.0, entry.cpu + (noise[0] + noise[1] - 1.0) * 10
                                       + 0.2 * (entry.base_cpu - entry.cpu)))
            entry.memory = min(100.0, max(0.0, entry.memory + (noise[2] + noise[3] - 1.0) * 5
                                          + 0.1 * (entry.base_memory - entry.memory)))
            cpu, memory = entry.cpu, entry.memory
        return {"cpu": "%d%%" % round(cpu), "memory": "%d%%" % round(memory), "service": entry.service}


class SimulatorSettings(NamedTuple):
    """What `simulate` serves, and where."""
    host: str = "127.0.0.1"
    port: int = 0
    servers: int = 150
    latency_ms: float = 0.0
    seed: Optional[int] = None
    single_threaded: bool = False
    sickness: Sickness = Sickness()


def serve_simulator(settings: SimulatorSettings) -> Any:
    """Start a CPX-compatible server in a background thread; returns the server (see .url)."""
    import json
    import socket
    QuietServer, QuietHandler = _http_classes()
    fleet = SimulatedFleet(settings.servers, settings.seed, settings.sickness)
    server_list = json.dumps(fleet.ips).encode()
    stopping = threading.Event()  # set on close: hanging answers end

    class SimulatorHandler(QuietHandler):  # type: ignore[valid-type,misc]
        server_version = "cpx-simulator/" + __version__

        def do_GET(self) -> None:
            sick = fleet.sick.get(self.path[1:])
            if sick == FAIL:
                return self.answer(500, b'{"error": "Internal Server Error"}')
            if settings.latency_ms:
                time.sleep(settings.latency_ms / 1000.0)
            if sick == HANG:
                return self.hang()
            if sick == SLOW:
                time.sleep(settings.sickness.slow_ms / 1000.0)
            reading = server_list if self.path == "/servers" else fleet.read(self.path[1:])
            if reading is None:
                return self.answer(400, b'{"error": "Invalid IP"}')
            self.answer(200, reading if isinstance(reading, bytes) else json.dumps(reading).encode())

        def hang(self) -> None:
            import select
            self.close_connection = True
            while not stopping.is_set():
                if select.select([self.connection], [], [], 0.2)[0]:
                    try:
                        if not self.connection.recv(1, socket.MSG_PEEK):
                            return  # the client closed the connection
                    except OSError:
                        return
                    stopping.wait(0.2)  # it sent more than its request: keep hanging

    class SimulatorServer(QuietServer):  # type: ignore[valid-type,misc]
        request_queue_size = 5 if settings.single_threaded else 1024
        simulated = fleet  # for the tests and the benchmark

        def process_request(self, request: Any, client_address: Any) -> None:
            if settings.single_threaded:  # in the serving thread, as socketserver's own does
                self.process_request_thread(request, client_address)
            else:
                super().process_request(request, client_address)

        def server_close(self) -> None:
            stopping.set()
            super().server_close()

    return listening(lambda: SimulatorServer((settings.host, settings.port), SimulatorHandler), settings)


def cmd_simulate(settings: SimulatorSettings) -> int:
    """Serve a simulated fleet until Ctrl+C or SIGTERM."""
    sickness = settings.sickness
    if sum(sickness.counts(settings.servers)) > settings.servers:
        raise UsageError("--fail-fraction, --hang-fraction and --slow-fraction add up to more than the fleet")
    server = serve_simulator(settings)
    whats = ("answer HTTP 500", "hang", "answer %g ms late" % sickness.slow_ms)
    sick = ", ".join("%d %s" % (n, what) for n, what in zip(sickness.counts(settings.servers), whats) if n)
    say("%s: simulating %d servers%s, listening on %s (Ctrl+C to stop)"
        % (program_name(), settings.servers, " (%s)" % sick if sick else "", server.url))
    return serve_until_stopped(server)


# Shell completion, generated from the parser itself so that it cannot drift from it ---------------

COMPLETED_NAMES = ("cpx-devops", "cpx_devops.py")  # what `make install` installs, and the file
SHELLS = ("bash", "zsh", "fish")


def completion_table(parser: Any) -> Dict[str, Tuple[List[Tuple[Sequence[str], Any]], Any]]:
    """Per command ("" for the program): its options as (spellings, what the value completes: None,
    "file", "service", "other" or words), and what its positional completes."""
    def read(command: Any) -> Tuple[List[Tuple[Sequence[str], Any]], Any]:
        options, positional = [], tuple(command.commands) or None  # type: Tuple[List[Any], Any]
        for action, completes, alias in command.arguments:
            value = completes or (None if action.nargs == 0 else "other")
            if alias:
                continue
            if action.option_strings:
                options.append((action.option_strings, value))
            else:
                positional = value
        return options, positional

    table = {"": read(parser)}
    table.update((name, read(command.populate())) for name, command in parser.commands.items())
    return table


# Service names from SERVICE_CACHE (CPX_COMPLETE_LIVE: refreshed by `status` first), the user's own regular
# file: compared as plain strings (no compgen -W, eval or unquoted expansion), inserted quoted.
_SHELL_PROLOGUES = {
    "bash": ("# bash completion for cpx_devops, made by `cpx_devops.py completion bash` from its parser.\n"
             "_cpx_devops_words() {  # the words given that begin with what was typed\n"
             "    local word\n"
             '    for word in "$@"; do [[ $word == "$cur"* ]] && COMPREPLY+=("$word"); done\n'
             "}\n"
             "_cpx_devops_files() {\n"
             "    local file\n"
             "    compopt -o filenames 2>/dev/null\n"
             '    while IFS= read -r file; do COMPREPLY+=("$file"); done < <(compgen -f -- "$cur")\n'
             "}\n"
             "_cpx_devops_services() {\n"
             "    local name quoted typed=${cur#[\\\"\\']} cache=${XDG_CACHE_HOME:-}\n"
             "    typed=${typed//\\\\/}\n"
             "    [[ $cache == /* ]] || cache=$HOME/.cache  # a relative one is ignored (the XDG spec)\n"
             "    cache+=/%(cache)s\n"
             '    [ -n "${CPX_COMPLETE_LIVE:-}" ] && "${COMP_WORDS[0]}" -q --deadline 3 status >/dev/null 2>&1\n'
             '    [ -f "$cache" ] && [ ! -L "$cache" ] && [ -O "$cache" ] || return\n'
             "    # After a quote typed, readline quotes the name for it, and closes it (-o filenames).\n"
             '    [[ $cur == [\\"\\\']* ]] && compopt -o filenames 2>/dev/null\n'
             "    while IFS= read -r name; do\n"
             '        case $name in ""|-*|*[[:cntrl:]]*) continue;; esac\n'
             '        [[ $name == "$typed"* ]] || continue\n'
             '        [[ $cur == [\\"\\\']* ]] && quoted=$name || printf -v quoted %%q "$name"\n'
             '        COMPREPLY+=("$quoted")\n'
             '    done < "$cache"\n'
             "}\n"
             "_cpx_devops() {\n"
             "    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]} command= i\n"
             "    COMPREPLY=()\n"
             "    for ((i = 1; i < COMP_CWORD; i++)); do\n"
             "        case ${COMP_WORDS[i]} in %(commands)s) command=${COMP_WORDS[i]}; break;; esac\n"
             "    done"),
    "zsh": ("# zsh completion for cpx_devops, made by `cpx_devops.py completion zsh` from its parser.\n"
            "# It needs zsh's completion system: 'autoload -Uz compinit && compinit' in ~/.zshrc first.\n"
            "if (( ! $+functions[compdef] )); then\n"
            "    print -u2 \"cpx_devops: add 'autoload -Uz compinit && compinit' to ~/.zshrc, before this script\"\n"
            "    return 1\n"
            "fi\n"
            "_cpx_devops_words() { compadd -- \"$@\" }\n"
            "_cpx_devops_files() { _files }\n"
            "_cpx_devops_services() {\n"
            "    emulate -L zsh\n"
            "    local cache=${XDG_CACHE_HOME:-}\n"
            "    [[ $cache == /* ]] || cache=$HOME/.cache\n"
            "    cache+=/%(cache)s\n"
            "    local -a names\n"
            '    [[ -n ${CPX_COMPLETE_LIVE:-} ]] && "${words[1]}" -q --deadline 3 status >/dev/null 2>&1\n'
            "    [[ -f $cache && ! -L $cache && -O $cache ]] || return\n"
            '    names=("${(@f)$(<$cache)}")\n'
            '    compadd -- "${(@)names:#(|-*|*[[:cntrl:]]*)}"\n'
            "}\n"
            "_cpx_devops() {\n"
            "    emulate -L zsh\n"
            "    local cur=${words[CURRENT]} prev=${words[CURRENT-1]} command= i\n"
            "    for ((i = 2; i < CURRENT; i++)); do\n"
            "        case ${words[i]} in %(commands)s) command=${words[i]}; break;; esac\n"
            "    done"),
}
_SHELL_EPILOGUES = {"bash": "}\ncomplete -F _cpx_devops %s\n", "zsh": "}\ncompdef _cpx_devops %s\n"}


def _reply(value: Any) -> str:
    return {"file": "_cpx_devops_files", "service": "_cpx_devops_services", "other": ":"}.get(
        value) or "_cpx_devops_words " + " ".join(value)


def _case_completion(table: Dict[str, Any], shell: str) -> str:
    """bash's or zsh's script: values by `command/previous word`, else options or positional words."""
    by_reply: Dict[str, List[Tuple[str, str]]] = {}  # reply -> (command, option) pairs
    meanings: Dict[str, Set[str]] = {}  # option -> its replies in every command
    for name, (options, _) in table.items():
        for spellings, value in options:
            for spelling in spellings if value is not None else ():
                by_reply.setdefault(_reply(value), []).append((name, spelling))
                meanings.setdefault(spelling, set()).add(_reply(value))
    lines = [_SHELL_PROLOGUES[shell] % {"cache": "/".join(SERVICE_CACHE), "commands": "|".join(
        name for name in table if name)}, '    case "$command/$prev" in']
    for reply, pairs in by_reply.items():  # an option that means one thing everywhere: */option
        patterns = dict.fromkeys("*/" + spelling if len(meanings[spelling]) == 1 else name + "/" + spelling
                                 for name, spelling in pairs)
        lines.append("        %s) %s; return;;" % ("|".join(patterns), reply))
    lines += ["    esac", '    case "$command" in']
    for name, (options, positional) in table.items():
        words = _reply(tuple(spelling for spellings, _ in options for spelling in spellings))
        lines.append("        '%s') %s;;" % (name, "if [[ $cur == -* ]]; then %s; else %s; fi" % (
            words, _reply(positional)) if positional else words))
    return "\n".join(lines + ["    esac"]) + "\n" + _SHELL_EPILOGUES[shell] % " ".join(COMPLETED_NAMES)


def _fish_completion(table: Dict[str, Any]) -> str:
    """fish's script: a `complete` line per option and command's words; the global options once."""
    lines = ["# fish completion for cpx_devops, made by `cpx_devops.py completion fish` from its parser.",
             "function __cpx_devops_services",
             "    set -l cache $HOME/.cache",
             "    string match -q -- '/*' \"$XDG_CACHE_HOME\"; and set cache $XDG_CACHE_HOME",
             "    set cache $cache/%s" % "/".join(SERVICE_CACHE),
             "    set -l program (commandline -opc)[1]",
             "    set -q CPX_COMPLETE_LIVE; and $program -q --deadline 3 status >/dev/null 2>&1",
             "    test -f $cache -a ! -L $cache -a -O $cache; or return",
             "    string match -rv -- '^$|^-|[[:cntrl:]]' <$cache",
             "end",
             "complete -c %s -f" % COMPLETED_NAMES[0]]
    values = {"file": " -r -F", "service": " -x -a '(__cpx_devops_services)'", "other": " -x", None: ""}
    shared = {tuple(spellings) for spellings, _ in table[""][0]}
    others = [name for name, (options, _) in table.items()
              if name and not shared <= {tuple(s) for s, _ in options}]
    for name, (options, positional) in table.items():
        condition = ("not __fish_seen_subcommand_from " + " ".join(others) if not name else
                     "__fish_seen_subcommand_from " + name)
        head = "complete -c %s -n '%s'" % (COMPLETED_NAMES[0], condition)
        if positional:
            words = ("(__cpx_devops_services)",) if positional == "service" else positional
            lines.append("complete -c %s -n '%s' -a '%s'" % (COMPLETED_NAMES[0], condition if name else
                                                             "__fish_use_subcommand", " ".join(words)))
        for spellings, value in options:
            if not name or name in others or tuple(spellings) not in shared:
                flags = "".join(" -l " + s[2:] if s.startswith("--") else " -s " + s[1:] for s in spellings)
                lines.append(head + flags + values.get(value, " -x -a '%s'" % " ".join(value or ())))
    return "\n".join(lines + ["complete -c %s -w %s" % (COMPLETED_NAMES[1], COMPLETED_NAMES[0])]) + "\n"


# The command line and main() ----------------------------------------------------------------------

COMMAND_ALIASES = {"unhealthy-services": "unhealthy"}  # the original exercise's spellings, not in --help

ENVIRONMENT = (
    ("CPX_URL", "base URL without --url (default %s)" % DEFAULT_URL),
    ("CPX_POLICY", "the policy file without --policy"),
    ("CPX_COMPLETE_LIVE", "set: completion runs `status` at each Tab for names"),
    ("NO_COLOR", "set and not empty: no colour with --color auto"),
    ("TERM", "dumb: no colour with --color auto, and no live screen"),
    ("XDG_CACHE_HOME", "where names are kept for completion (else ~/.cache)"),
    ("COLUMNS, LINES", "track's screen size, when the terminal does not tell"),
    ("http_proxy...", "urllib's proxies: http_proxy, https_proxy, no_proxy"),
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (closest choice suggested), help via emit(), a record for completion."""
    def __init__(self, *args: Any, **kwargs: Any):
        self.arguments: List[Tuple[argparse.Action, Any, bool]] = []  # (action, what it completes, alias)
        self.commands: Dict[str, "_Parser"] = {}
        self.builders: List[Callable[["_Parser"], None]] = []  # what adds its arguments, not run yet
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, completes: Any = None, alias: bool = False, **kwargs: Any) -> Any:
        """argparse's, recording what the value completes (its choices unless said) and aliases."""
        action = super().add_argument(*args, **kwargs)
        self.arguments.append((action, completes or tuple(map(str, action.choices or ())) or None, alias))
        return action

    def spellings(self) -> List[str]:
        return [spelling for action, _, _ in self.arguments for spelling in action.option_strings]

    def _get_option_tuples(self, option_string: str) -> Any:
        # No long option abbreviated (--ur); -ojson and -qv read on 3.7 too (bpo-26967). No public hook.
        return [t for t in super()._get_option_tuples(option_string) if t[1] == option_string[:2]]

    def add_command(self, commands: Any, name: str, help_text: str, examples: str,
                    arguments: Callable[["_Parser"], None], reads_cpx: bool, alias: bool = False) -> "_Parser":
        """A command, whose arguments are added when it is first parsed or completed (populate())."""
        epilog = "examples:\n%s\nThe global options and the exit statuses: %s --help" % (
            "".join("  %(prog)s " + example + "\n" for example in examples.split("\n")), self.prog)
        command = commands.add_parser(name, description=help_text, epilog=epilog,
                                      formatter_class=argparse.RawDescriptionHelpFormatter,
                                      **({} if alias else {"help": help_text}))
        command.builders = [arguments] + ([functools.partial(_add_global_options, on_command=True)]
                                          if reads_cpx else [])
        if not alias:
            self.commands[name] = command
        return command

    def populate(self) -> "_Parser":
        builders, self.builders = self.builders, []
        if builders:
            self.add_argument("--version", action=_Version, help=argparse.SUPPRESS)
        for build in builders:
            build(self)
        return self

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        return super(_Parser, self.populate()).parse_known_args(args, namespace)

    def format_help(self) -> str:
        """argparse's help; the program's own ends with the environment and the exit statuses."""
        text = super().format_help()
        if self.commands:
            import textwrap
            text += "\nenvironment:\n" + "".join("  %-18s %s\n" % pair for pair in ENVIRONMENT)
            text += "\nexit status:\n" + "".join(textwrap.fill(meaning.replace("`", ""), 79, initial_indent=(
                "  %-5d" % code), subsequent_indent=" " * 7) + "\n" for code, meaning in EXIT_STATUSES)
        return text

    def print_help(self, file: Any = None) -> None:
        emit(self.format_help())

    def exit(self, status: int = 0, message: Optional[str] = None) -> NoReturn:
        if message:
            say(message.rstrip("\n"))
        sys.exit(status)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, "%s: error: %s (see '%s --help')" % (program_name(), message, self.prog))

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        # argparse's check plus the closest choice (a typo'd command, say): no public hook before 3.14.
        choices = [str(choice) for choice in action.choices or () if choice not in COMMAND_ALIASES]
        if action.choices is not None and value not in action.choices:
            raise argparse.ArgumentError(action, "invalid choice: %r%s (choose from %s)" % (
                sanitize(value), _suggestion(value, choices), ", ".join(choices)))


class _Version(argparse.Action):
    """--version: the program's name and version on stdout, exit 0."""
    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 help: str = "show the version and exit", **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, help=help, default=argparse.SUPPRESS)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Optional[str] = None) -> None:
        emit("%s %s\n" % (os.path.basename(sys.argv[0]) or "cpx_devops.py", __version__))
        parser.exit()


def _number(kind: Callable[[str], Any], low: Any, high: Any, what: str) -> Callable[[str], Any]:
    """An option's type: a number of this kind from low to high (NaN refused)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a %snumber" % (text, "whole " if kind is int else ""))
        if not low <= value <= high:
            raise argparse.ArgumentTypeError("%r must be %s from %g to %g" % (text, what, low, high))
        return value
    return parse


_seconds = _number(float, 0.001, MAX_SECONDS, "a number of seconds")
_interval = _number(float, MIN_INTERVAL, MAX_SECONDS, "a number of seconds")


def _names(choices: Optional[Sequence[str]] = None) -> Callable[[str], List[str]]:
    """An option's type: comma-separated names or patterns; with choices, each one of them."""
    def parse(text: str) -> List[str]:
        names = [name.strip() for name in text.split(",")]
        if not all(names):
            raise argparse.ArgumentTypeError("%r has an empty name" % text)
        if not choices:
            return names
        for name in names:
            if name.lower() not in choices:
                raise argparse.ArgumentTypeError("unknown status %r%s (choose from %s)" % (
                    sanitize(name), _suggestion(name.lower(), choices), ", ".join(choices)))
        return [name.lower() for name in names]
    return parse


def _shard(text: str) -> Shard:
    match = re.match(r"([0-9]{1,6})/([0-9]{1,6})\Z", text.strip())
    if not match:
        raise argparse.ArgumentTypeError("%r is not K/N (shard K of N, such as 1/4)" % text)
    if not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise argparse.ArgumentTypeError("%r: K must be from 1 to N" % text)
    return Shard(int(match.group(1)), int(match.group(2)))


def _min_healthy_option(text: str) -> Any:
    try:
        minimum = parse_min_healthy(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))
    if isinstance(minimum, HealthyCount) and minimum.least < 1:
        raise argparse.ArgumentTypeError("%r must be 1 or more" % text)
    return minimum


def _percent_option(text: str) -> float:
    try:
        return parse_percent(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a percentage from 0 to 100" % text)


def _listen(text: str) -> Tuple[str, int]:
    match = re.match(r"(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]]*)):([0-9]{1,5})\Z", text.strip())
    if not match or int(match.group(3)) > 65535:
        raise argparse.ArgumentTypeError("%r is not HOST:PORT, [IPV6]:PORT or :PORT (a port up to 65535)"
                                         % sanitize(text))
    return match.group(1) or match.group(2) or "", int(match.group(3))


def _add_global_options(parser: _Parser, on_command: bool) -> None:
    """The global options, on the program and (hidden, no defaults) on each command that reads CPX."""
    def add(*args: Any, **kwargs: Any) -> None:
        if on_command:
            kwargs.update(help=argparse.SUPPRESS, default=argparse.SUPPRESS)
        parser.add_argument(*args, **kwargs)

    add("--url", help="CPX API base URL (default: $CPX_URL, else %s)" % DEFAULT_URL)
    add("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
        help="per-request timeout, for its whole life (default %g)" % DEFAULT_TIMEOUT)
    add("--deadline", type=_seconds, metavar="SECONDS",
        help="time limit for a command (default %g); for track, for a sample's /servers and again for "
             "its reads (default: the interval, at least 1 s); for serve, a scrape's most" % DEFAULT_DEADLINE)
    add("--retries", type=_number(int, 0, 10, "a count"), default=DEFAULT_RETRIES, metavar="N",
        help="retries of a failed request: connection errors, timeouts, HTTP 429/502/503/504 (default %d)"
             % DEFAULT_RETRIES)
    add("--workers", type=_number(int, 1, 1024, "a count"), default=DEFAULT_WORKERS, metavar="N",
        help="most requests in flight at once, adapted to the server (default %d)" % DEFAULT_WORKERS)
    add("--concurrency", choices=("adaptive", "fixed"), default="adaptive",
        help="adaptive (default) or fixed at --workers")
    for resource in ("cpu", "mem"):
        add("--%s-threshold" % resource, type=_percent_option, metavar="PCT", help="Unhealthy above this %s, "
            "for every service (default: the policy's, else %g)" % (resource, DEFAULT_THRESHOLD))
    add("--policy", metavar="FILE", completes="file",
        help="the fleet's policy (INI): expected services, minimums, thresholds (default: $CPX_POLICY)")
    add("--shard", metavar="K/N", type=_shard, help="read only slice K of N of the fleet, for N exporters")
    add("-o", "--output", choices=OUTPUT_FORMATS, default="table", help="output format (default table)")
    add("-q", "--quiet", action="store_true", help="hide warnings (errors always show)")
    add("--no-headers", action="store_true", help="no header row (table, csv) and no line under a table")
    add("--write", metavar="FILE", completes="file", help="write the output to FILE atomically")
    add("--color", choices=COLOR_MODES, default="auto", help="colour: auto (on a terminal; the default), "
                                                             "always (watch -c), or never")
    add("--no-color", dest="color", action="store_const", const="never", help="the same as --color never")
    add("-v", "--verbose", action="store_true", help="say on stderr how the fetch went")
    add("--cp-url", dest="url", alias=True, help=argparse.SUPPRESS)


def _services_arguments(command: _Parser) -> None:
    command.add_argument("--service", metavar="NAME", type=_names(), action="append", default=[],
                         completes="service", help="only these services' instances: names or shell-style "
                                                   "patterns ('Pay*'), comma-separated or repeated")
    command.add_argument("--status", metavar="STATUS", type=_names(STATUS_FILTERS), action="append",
                         default=[], completes=STATUS_FILTERS,
                         help="only instances in these statuses: healthy, unhealthy, unknown")
    command.add_argument("--sort", choices=SORT_KEYS, default="service",
                         help="row order (default: service, then IP; cpu/memory highest first)")
    _snapshot_arguments(command)


def _status_arguments(command: _Parser) -> None:
    command.add_argument("service", nargs="*", type=_names(), metavar="SERVICE", completes="service",
                         help="only these services: names or shell-style patterns")
    command.add_argument("--service", dest="named", type=_names(), action="append", default=[], alias=True,
                         help=argparse.SUPPRESS)
    command.add_argument("--sort", choices=SUMMARY_SORT_KEYS, default="service", help="row order (default: "
                         "service; instances most first, healthy fewest first, cpu/memory highest first)")
    _snapshot_arguments(command)


def _unhealthy_arguments(command: _Parser) -> None:
    command.add_argument("--min-healthy", type=_min_healthy_option, metavar="N|PCT%",
                         help="every service's minimum, a count or a share of its instances (50%%%%) "
                              "(default: the policy's, else %d)" % DEFAULT_MIN_HEALTHY)
    _snapshot_arguments(command)


def _snapshot_arguments(command: _Parser) -> None:
    command.add_argument("--reverse", action="store_true", help="the rows in the opposite order")
    command.add_argument("--strict", action="store_true", help="exit %d after the output when any instance "
                                                               "could not be read" % EXIT_PARTIAL)


def _track_arguments(command: _Parser) -> None:
    watched = command.add_mutually_exclusive_group()
    command.arguments += [
        (watched.add_argument("service", nargs="?", metavar="SERVICE", help="the service to watch, a row per "
                              "instance (default: the whole fleet)"), "service", False),
        (watched.add_argument("--all", action="store_true", help="the whole fleet, a row per service, worst "
                              "first (the default)"), None, False)]
    command.add_argument("-n", "--interval", type=_interval, default=DEFAULT_INTERVAL, metavar="SECONDS",
                         help="time between samples, %g or more (default %g)" % (MIN_INTERVAL, DEFAULT_INTERVAL))
    command.add_argument("-c", "--count", type=_number(int, 1, 10 ** 9, "a count"), metavar="N",
                         help="stop after N samples")
    command.add_argument("--rediscover", type=_seconds, default=DEFAULT_REDISCOVER, metavar="SECONDS",
                         help="re-read the whole fleet this often (default %g)" % DEFAULT_REDISCOVER)


def _serve_arguments(command: _Parser) -> None:
    command.add_argument("--listen", type=_listen, default=("127.0.0.1", SERVE_PORT), metavar="HOST:PORT",
                         help="where (default 127.0.0.1:%d, loopback only; :PORT: all of IPv4)" % SERVE_PORT)
    command.add_argument("--min-interval", type=_number(float, 0, MAX_SECONDS, "a number of seconds"),
                         default=0.0, metavar="SECONDS", help="serve the last read to scrapes this close to "
                                                              "its start (default 0: each scrape reads)")


def _completion_arguments(command: _Parser) -> None:
    command.add_argument("shell", choices=SHELLS, help="the shell to complete for")


def _simulate_arguments(command: _Parser) -> None:
    command.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1; ::1 for IPv6)")
    command.add_argument("--port", type=_number(int, 0, 65535, "a port"), default=8080,
                         help="port (default 8080; 0 picks a free one)")
    command.add_argument("--servers", type=_number(int, 1, 10 ** 6, "a count"), default=150,
                         help="fleet size (default 150)")
    command.add_argument("--seed", type=int, help="random seed, for a reproducible fleet")
    command.add_argument("--single-threaded", action="store_true",
                         help="one request at a time, a listen backlog of 5: the reference server")
    for name, default, what in (("--latency-ms", 0.0, "delay before every answer"),
                                ("--slow-ms", 700.0, "how late the slow instances answer")):
        command.add_argument(name, type=_number(float, 0, 3600000, "milliseconds"), default=default,
                             metavar="MS", help="%s (default %g)" % (what, default))
    for kind, what in (("fail", "answer HTTP 500 at once"), ("hang", "never answer"),
                       ("slow", "answer --slow-ms late")):
        command.add_argument("--%s-fraction" % kind, type=_number(float, 0, 1, "a fraction"), default=0.0,
                             metavar="F", help="this fraction of the instances %s (default 0)" % what)


# Each command: help, examples, its arguments' builder (run when it is parsed), whether it reads CPX.
COMMANDS = (
    ("services", "every instance: IP, service, status, cpu, memory", "--service UserService --sort cpu\n"
     "-o csv > fleet.csv\n--status unhealthy,unknown", _services_arguments, True),
    ("status", "per service: instances, healthy, average and maximum cpu and memory",
     "UserService -o json\n'Pay*,Auth*' -o wide\n--sort cpu", _status_arguments, True),
    ("unhealthy", "services under their minimum of healthy instances, or expected and missing (exit 1 if any)",
     "--min-healthy 3 -o json\n--policy fleet.ini", _unhealthy_arguments, True),
    ("track", "a live view of one service, or of the whole fleet, until q or Ctrl+C", "UserService\n"
     "UserService -n 0.5 -c 20 -o json\n--all          (a row per service)", _track_arguments, True),
    ("serve", "a Prometheus exporter: reads the fleet at each scrape of /metrics", "\n--listen :%d --policy "
     "/etc/cpx/policy.ini\n--listen 127.0.0.1:0     (a free port)" % SERVE_PORT, _serve_arguments, True),
    ("completion", "print a shell completion script", "bash > ~/.local/share/bash-completion/completions/"
     "cpx-devops\nfish > ~/.config/fish/completions/cpx-devops.fish", _completion_arguments, False),
    ("simulate", "a CPX-compatible API server, for demos and tests", "--port 0 --servers 1000 --latency-ms 20\n"
     "--latency-ms 20 --hang-fraction 0.07 --slow-fraction 0.5", _simulate_arguments, False),
)


def build_parser() -> _Parser:
    """The command line: global options before or after a command."""
    parser = _Parser(prog=os.path.basename(sys.argv[0]) or "cpx_devops.py",
                     description="See the health of a CPX fleet in seconds.",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="examples:\n" + "".join("  %(prog)s " + line + "\n" for line in (
                         "services --sort cpu", "status UserService", "unhealthy || page-oncall",
                         "track UserService -n 1", "track                  (the whole fleet)", "serve",
                         "simulate --port 8080")))
    parser.add_argument("--version", action=_Version)
    _add_global_options(parser, on_command=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)
    for name, help_text, examples, arguments, reads_cpx in COMMANDS:
        parser.add_command(commands, name, help_text, examples, arguments, reads_cpx)
    for alias, name in COMMAND_ALIASES.items():
        parser.add_command(commands, alias, *next(c[1:] for c in COMMANDS if c[0] == name), alias=True)
    return parser


def _unknown_option(parser: _Parser, argv: Sequence[str]) -> Optional[str]:
    """The first option before the command that the program does not take (argparse reads it as a value)."""
    takes = {s: action for action, _, _ in parser.arguments for s in action.option_strings}
    words = iter(argv)
    for word in words:
        if word in parser.commands or word in COMMAND_ALIASES or word == "--":
            return None
        if word.startswith("-") and word != "-":
            action = takes.get(word.split("=", 1)[0]) or takes.get(word[:2])
            if action is None:
                return word
            if action.nargs != 0 and word in action.option_strings:
                next(words, None)  # its value, whatever it looks like
    return None


def use_color(stream: Any, mode: str, environ: Dict[str, str]) -> bool:
    """--color: always, never, or auto (a terminal, without NO_COLOR or TERM=dumb)."""
    if mode != "auto":
        return mode == "always"
    return (not environ.get("NO_COLOR") and environ.get("TERM") != "dumb"
            and hasattr(stream, "isatty") and stream.isatty())


def options_from_args(args: argparse.Namespace, environ: Dict[str, str]) -> Options:
    """The options record for a command, from parsed arguments and the environment."""
    given = args.url if args.url is not None else environ.get("CPX_URL") or DEFAULT_URL
    url, authorization = parse_base_url(given, "--url" if args.url is not None else "$CPX_URL")
    interactive = sys.stdout is not None and sys.stdout.isatty() and environ.get("TERM") != "dumb"
    cache_home = environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(cache_home):  # as the XDG spec says: a relative one is ignored
        cache_home = os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".cache")
    source = "--policy" if args.policy is not None else "$CPX_POLICY"
    path = args.policy if args.policy is not None else environ.get("CPX_POLICY") or None
    policy = Policy() if path is None else read_policy(path, source)
    policy = policy.overridden(args.cpu_threshold, args.mem_threshold, getattr(args, "min_healthy", None))
    return Options(url=url, authorization=authorization, timeout=args.timeout, deadline=args.deadline,
                   retries=args.retries, workers=args.workers, adaptive=args.concurrency == "adaptive",
                   shard=args.shard, output=args.output, quiet=args.quiet, verbose=args.verbose,
                   # Never colour a file: --write's codes would be read by a collector, not a terminal.
                   color=args.write is None and use_color(sys.stdout, args.color, environ),
                   interactive=interactive, headers=not args.no_headers, write=args.write, policy=policy,
                   service_cache=os.path.join(cache_home, *SERVICE_CACHE)
                   if interactive or environ.get("CPX_COMPLETE_LIVE") else None)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, build the settings of the command asked for, and run it; exceptions are left to main()."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    unknown = _unknown_option(parser, argv)
    if unknown is not None:
        parser.error("unrecognized arguments: %s%s" % (unknown, _suggestion(unknown, parser.spellings())))
    args, extras = parser.parse_known_args(argv)
    command = COMMAND_ALIASES.get(args.command, args.command)
    if extras:
        parser.error("unrecognized arguments: %s%s" % (" ".join(extras), _suggestion(
            extras[0], parser.commands[command].spellings())))
    if command == "simulate":
        sickness = Sickness(args.fail_fraction, args.hang_fraction, args.slow_fraction, args.slow_ms)
        return cmd_simulate(SimulatorSettings(args.host, args.port, args.servers, args.latency_ms, args.seed,
                                              args.single_threaded, sickness))
    if command == "completion":
        table = completion_table(parser)
        emit(_fish_completion(table) if args.shell == "fish" else _case_completion(table, args.shell))
        return EXIT_OK
    options = options_from_args(args, dict(os.environ))
    if command == "serve":
        return cmd_serve(options, ServeSettings(args.listen[0], args.listen[1], args.min_interval))
    if options.write is not None and command != "track":
        check_writable(options.write)
    elif sys.stdout is None:
        raise UsageError("stdout is closed (>&-): nowhere to write the output; use --write FILE")
    client = CpxClient(options)
    try:
        if command == "track":
            settings = TrackSettings(args.service, args.interval, args.count, args.rediscover)
            return cmd_track(client, options, settings)
        named = getattr(args, "service", []) + getattr(args, "named", [])  # unhealthy takes none
        services = [name for names in named for name in names]
        statuses = [s for names in getattr(args, "status", ()) for s in names]
        report, code = snapshot_report(REPORTS[command], client, options, services, statuses,
                                       getattr(args, "sort", "service"), args.reverse, args.strict)
        deliver(report.render(options), options)
        return code
    finally:
        # Not on Ctrl+C or SIGTERM: os._exit ends it all; an interrupted pool lock (bpo-29988) hangs close().
        if not isinstance(sys.exc_info()[1], (KeyboardInterrupt, Terminated)):
            client.close()


def _quiet_stdout() -> None:
    with contextlib.suppress(AttributeError, OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The program: one line on stderr for any failure, an exit status from the contract."""
    name = program_name()
    try:
        if signal.getsignal(signal.SIGINT) is _interrupted_at_start:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # start-up is over
        signal.signal(signal.SIGTERM, _on_sigterm)
        return run(argv)
    except (UsageError, CpxUnavailable) as error:
        say("%s: error: %s%s" % (name, getattr(error, "prefix", ""), error))
        return EXIT_USAGE if isinstance(error, UsageError) else EXIT_UNAVAILABLE
    except OutputFailed as error:
        say("%s: error: %s" % (name, error))
        _quiet_stdout()
        return EXIT_OUTPUT
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Terminated:
        return EXIT_TERMINATED
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as error:  # noqa: BLE001 (a bug: one line that says where, not a traceback nor exit 1)
        import traceback
        where = traceback.extract_tb(error.__traceback__)[-1]
        say("%s: internal error: %s: %s (%s line %d; please report it)" % (
            name, type(error).__name__, sanitize(error), os.path.basename(where.filename), where.lineno or 0))
        return EXIT_INTERNAL


def _exit(code: int) -> NoReturn:
    """Exit now: requests still in flight must not hold the process (Ctrl+C, deadline)."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except (OSError, ValueError) as error:
        _quiet_stdout()
        code = code or (EXIT_BROKEN_PIPE if isinstance(error, BrokenPipeError) else EXIT_OUTPUT)
    with contextlib.suppress(OSError, ValueError):
        if sys.stderr is not None:
            sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
