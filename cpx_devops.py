#!/usr/bin/env python3
"""cpx_devops: the health of a fleet on Cloud Provider X (CPX), in seconds.

One file, standard library only, Python 3.7 or newer. It reads the CPX API
(GET /servers, then GET /<ip> for every instance, concurrently) and prints
what an SRE needs during an incident.

Usage:
  cpx_devops.py [global options] services [--service NAME,PATTERN...] [--status STATUS...]
                                          [--sort KEY] [--reverse] [--strict]
  cpx_devops.py [global options] status [SERVICE...] [--sort KEY] [--reverse] [--strict]
  cpx_devops.py [global options] unhealthy [--min-healthy N|PCT%] [--reverse] [--strict]
  cpx_devops.py [global options] track [SERVICE | --all] [-n SECONDS] [-c COUNT]
  cpx_devops.py completion bash|zsh|fish
  cpx_devops.py simulate [--port 8080] [--servers 150] [--latency-ms 0] [--seed N]
                         [--fail-fraction F] [--hang-fraction F] [--slow-fraction F --slow-ms MS]

Global options include --url (or $CPX_URL), -o table|wide|json|csv|prometheus,
--write FILE (atomic), --policy FILE (or $CPX_POLICY), --shard K/N, --color,
--timeout, --deadline, --retries, --workers; see --help.

Health rule: an instance is Unhealthy when its cpu or its memory is strictly
above its threshold (90% each by default, or its service's in a policy),
Unknown when it could not be read or its data is invalid, Healthy otherwise.
A service needs a minimum of healthy instances (2 by default, or its policy's);
a policy's expected services are flagged when they have no instance.

"""

import os
import signal
import sys

if sys.version_info < (3, 7):  # before any import 3.6 lacks (dataclasses): one line, not a traceback
    sys.stderr.write("cpx_devops: error: Python 3.7 or newer is needed; this is Python %d.%d\n"
                     % tuple(sys.version_info[:2]))
    sys.exit(2)


def _interrupted_at_start(signum: int, frame: object) -> None:
    """Ctrl+C while the tool starts (its imports take about 30 ms): exit 130 at once, no traceback."""
    os._exit(130)


# Only when run as a program, and only when SIGINT has Python's usual handler: a tool
# started with SIGINT ignored (a background job) keeps it ignored. main() puts the
# usual handler back. Limit: the interpreter's own start, before this line, is not covered.
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_at_start)

# The imports come after that check and that handler (ruff: E402 is ignored for this).
import argparse
import csv
import difflib
import functools
import io
import ipaddress
import json
import random
import re
import shutil
import socket
import stat
import threading
import time
import unicodedata
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Any, Deque, Dict, Iterable, List, NoReturn, Optional, Sequence, Set, Tuple

__version__ = "1.0.0"

PROG = "cpx_devops"

EXIT_OK = 0
EXIT_FLAGGED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_PARTIAL = 4
EXIT_OUTPUT = 74  # EX_IOERR in sysexits.h
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
EXIT_TERMINATED = 143

# The exit-status contract, written once: the module docstring, --help and the
# README's table are made from (or checked against) it.
EXIT_STATUSES = (
    (EXIT_OK, "success; for `unhealthy`, no service flagged"),
    (EXIT_FLAGGED, "`unhealthy` flagged at least one service (under its minimum, or expected and missing)"),
    (EXIT_USAGE, "usage error: a bad option or value, an unknown service name or command, a URL that "
                 "cannot be requested (not http/https, a space, a bad host), a `--write` FILE that cannot be "
                 "written (checked before any request: a directory, FIFO, device or socket, a missing or "
                 "read-only directory); a policy file that cannot be read or is wrong (one line: the file, the line, "
                 "what); stdout closed (`>&-`) without `--write`; a Python older than 3.7"),
    (EXIT_UNAVAILABLE, "CPX unavailable: the server list could not be read or is not a list, it lists "
                       "no instance, or no instance at all could be read; or no readable instance has "
                       "the service asked for while some instances could not be read (it may be among "
                       "them; `track`: none answered in the whole session)"),
    (EXIT_PARTIAL, "`--strict` and some instance could not be read: the output was printed, from partial data "
                   "(for `unhealthy`, 1 when it flagged a service)"),
    (EXIT_OUTPUT, "the output could not be written: stdout failed (a full disk, an I/O error), or the "
                  "`--write` FILE failed after passing its up-front check"),
    (EXIT_INTERRUPTED, "interrupted by Ctrl+C (`track` exits 0: Ctrl+C is how it stops)"),
    (EXIT_BROKEN_PIPE, "stdout closed early, as for any Unix tool killed by SIGPIPE (under `| head`, "
                       "0 when the pipe took the whole output before it closed)"),
    (EXIT_TERMINATED, "terminated by SIGTERM"),
)


# simulate's own: it serves until stopped, and reads no CPX.
SIMULATE_EXIT_STATUSES = (
    (EXIT_USAGE, "usage error: a bad option or value, or an address it cannot listen on"),
    (EXIT_INTERRUPTED, "stopped by Ctrl+C, its usual end"),
) + tuple(entry for entry in EXIT_STATUSES if entry[0] == EXIT_TERMINATED)


def exit_status_text(indent: int = 2, width: int = 79, statuses: Sequence[Tuple[int, str]] = EXIT_STATUSES) -> str:
    """Exit statuses as plain text, one wrapped entry per status."""
    import textwrap

    lines = []
    for code, meaning in statuses:
        lead = " " * indent + "%-5d" % code
        lines += textwrap.wrap(meaning.replace("`", ""), width, initial_indent=lead,
                               subsequent_indent=" " * len(lead))
    return "\n".join(lines) + "\n"


if __doc__:  # None under python -OO
    __doc__ += "\nExit status:\n" + exit_status_text()

DEFAULT_URL = "http://localhost:8080"
DEFAULT_TIMEOUT = 5.0
DEFAULT_DEADLINE = 60.0
DEFAULT_RETRIES = 2
DEFAULT_WORKERS = 64
DEFAULT_THRESHOLD = 90.0
DEFAULT_MIN_HEALTHY = 2
DEFAULT_INTERVAL = 2.0

SERVERS_BODY_CAP = 16 * 1024 * 1024
INSTANCE_BODY_CAP = 64 * 1024
RETRYABLE_HTTP_STATUSES = frozenset({429, 502, 503, 504})
BACKOFF_BASE = 0.1
BACKOFF_CAP = 2.0
RETRY_AFTER_CAP = 10.0
MAX_SERVICE_NAME = 256
POLICY_SIZE_CAP = 1024 * 1024  # a policy is written by hand: more is the wrong file
SERVICE_CACHE = ("cpx_devops", "services")  # below the cache home: the service names shell completion offers
SERVICE_CACHE_CAP = 256 * 1024
IPS_LISTED_PER_REASON = 5

MIN_INTERVAL = 0.1
# The longest duration an option takes: more is a typo, and past about 292 years
# (threading.TIMEOUT_MAX) Python's waits overflow.
MAX_SECONDS = 86400
DEFAULT_REDISCOVER = 60.0
GONE = "Gone"

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
UNKNOWN = "Unknown"

SORT_KEYS = ("service", "ip", "status", "cpu", "memory")
OUTPUT_FORMATS = ("table", "wide", "json", "csv", "prometheus")
STATUS_FILTERS = ("healthy", "unhealthy", "unknown")
SUMMARY_SORT_KEYS = ("service", "instances", "healthy", "cpu", "memory")
COLOR_MODES = ("auto", "always", "never")

ENVIRONMENT_HELP = """\
environment:
  CPX_URL         base URL of the CPX API when --url is not given
                  (default %s)
  CPX_POLICY      the policy file when --policy is not given
  NO_COLOR        when set and non-empty, no colour with --color auto (the default)
  TERM=dumb       no colour with --color auto
  XDG_CACHE_HOME  where a run on a terminal leaves the service names for shell
                  completion (default ~/.cache)
""" % DEFAULT_URL

EXIT_STATUS_HELP = "exit status:\n" + exit_status_text()

SIMULATE_HELP = """\
environment:
  none: simulate reads no environment variable (CPX_URL is the other commands')

exit status:
""" + exit_status_text(statuses=SIMULATE_EXIT_STATUSES)


class CpxUnavailable(Exception):
    """CPX cannot be used at all: main() prints one line and exits 3."""

    prefix = "CPX unavailable: "


class ServiceUnreadable(CpxUnavailable):
    """No readable instance has the service asked for, but some could not be read: exit 3, not
    a usage error, since during an incident the service may well be among them."""

    prefix = ""


class UsageError(Exception):
    """The user asked for something that cannot be done: exit 2."""


class OutputFailed(Exception):
    """The output could not be written (stdout, or the --write file): exit 74."""


class Terminated(BaseException):
    """Raised by the SIGTERM handler so that the command unwinds quietly."""


# ---------------------------------------------------------------------------
# Records and parsing of API values
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    """Above these (strictly), an instance is Unhealthy; services may have their own (a policy)."""

    cpu: float = DEFAULT_THRESHOLD
    memory: float = DEFAULT_THRESHOLD
    services: Dict[str, "Thresholds"] = field(default_factory=dict, hash=False)  # by service name

    def for_service(self, service: Optional[str]) -> "Thresholds":
        """The thresholds of a service's instances: its own, else these."""
        return self.services.get(service, self) if service is not None else self


@dataclass
class Instance:
    """One instance as read from CPX; error says why it could not be read."""

    ip: str
    service: Optional[str] = None
    cpu: Optional[float] = None
    memory: Optional[float] = None
    error: Optional[str] = None
    answered: bool = field(default=False, compare=False)  # it sent JSON (valid or not), not a failure

    def usage(self) -> Optional[Tuple[float, float]]:
        """(cpu, memory) when the instance could be read and its data is valid, else None."""
        if self.error is not None or self.cpu is None or self.memory is None:
            return None
        return self.cpu, self.memory

    @property
    def readable(self) -> bool:
        """Whether it could be read with valid data: the one test of Unknown."""
        return self.usage() is not None


@dataclass
class ServiceSummary:
    """Per-service aggregate; service is None for instances of unknown service."""

    service: Optional[str]
    instances: int
    healthy: int
    avg_cpu: Optional[float]
    avg_memory: Optional[float]
    max_cpu: Optional[float] = None
    max_memory: Optional[float] = None
    max_cpu_ip: Optional[str] = None  # the hottest instance (the lowest IP of a tie)
    max_memory_ip: Optional[str] = None


@dataclass
class Snapshot:
    """One read of the whole fleet, how long it took, and when it started (ISO 8601, UTC)."""

    instances: List[Instance]
    seconds: float
    started: str = ""


@dataclass
class ServerList:
    """The fleet as /servers listed it: valid IPs once each, and what was refused."""

    ips: List[str]
    rejected: List[Any]
    duplicates: int
    other_shards: int = 0  # listed, but read by another shard (--shard)


_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\Z")
_IP_CHARACTERS = re.compile(r"[0-9A-Fa-f:.]{2,45}\Z")
_ASCII_DIGITS = re.compile(r"[0-9]{1,30}\Z")


def parse_percent(value: Any) -> float:
    """Read "61%", "61", 61 or 61.5 as a percentage in 0-100; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("not a percentage")
    if isinstance(value, (int, float)):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            text = text[:-1].rstrip()
        if not _DECIMAL.match(text):
            raise ValueError("not a percentage")
        number = float(text)
    else:
        raise ValueError("not a percentage")
    # Written so that NaN fails too; big ints are compared before any float().
    if not 0 <= number <= 100:
        raise ValueError("out of range")
    return float(number) + 0.0  # -0.0 becomes 0.0: never shown as "-0%"


def parse_instance(ip: str, payload: Any) -> Instance:
    """Turn one /<ip> answer into an Instance, with a short error when invalid."""
    return replace(_instance_from(ip, payload), answered=True)


def _instance_from(ip: str, payload: Any) -> Instance:
    if not isinstance(payload, dict):
        return Instance(ip, error="not a JSON object")
    service = payload.get("service")
    if "service" not in payload:
        return Instance(ip, error="missing service")
    if not isinstance(service, str) or not service.strip() or len(service) > MAX_SERVICE_NAME:
        return Instance(ip, error="invalid service")
    values = {}
    for name in ("cpu", "memory"):
        if name not in payload:
            return Instance(ip, service=service, error="missing " + name)
        try:
            values[name] = parse_percent(payload[name])
        except ValueError:
            return Instance(ip, service=service, error="invalid " + name)
    return Instance(ip, service=service, cpu=values["cpu"], memory=values["memory"])


_CANONICAL_IPV4 = re.compile(r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(?:\.(?!\Z)|\Z)){4}\Z")


def address_key(entry: Any) -> Optional[Any]:
    """One key per address for a plain IPv4/IPv6 address string (safe to put in a request
    path), else None: '::1' and '0:0:0:0:0:0:0:1' share one. Only the canonical IPv4 form is
    taken ('010.1.1.1' is refused, which older Pythons' ipaddress reads as an address)."""
    if not isinstance(entry, str) or not _IP_CHARACTERS.match(entry):
        return None
    if ":" not in entry:
        return entry if _CANONICAL_IPV4.match(entry) else None
    try:
        return socket.inet_pton(socket.AF_INET6, entry)
    except (OSError, ValueError):
        return None


def parse_server_list(payload: Any) -> ServerList:
    """Validate a /servers answer: a JSON list of IP strings (ValueError if not a list). Each
    spelling is looked at once, however often it is listed: 400,000 entries naming 200
    addresses cost what 200 do. An address listed twice is requested (and shown) as first
    listed, the spelling the server knows it by."""
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
    if not value:
        return None
    value = value.strip()
    if _ASCII_DIGITS.match(value):  # not str.isdigit(): it says yes to '²', which float() refuses
        return float(value)
    if any(ord(char) > 127 for char in value):  # an HTTP date is ASCII
        return None
    try:
        from email.utils import parsedate_to_datetime

        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):  # OverflowError: a year past any clock (fuzzing)
        return None
    if moment is None:
        return None
    current = time.time() if now is None else now
    try:
        return max(0.0, moment.timestamp() - current)
    except (OverflowError, OSError, ValueError):  # a date no clock can reach
        return None


def canonical_ip(ip: str) -> str:
    """One spelling per address ('0:0::1' is '::1'): what a shard is chosen from."""
    return ipaddress.ip_address(ip).compressed


def shard_of(ip: str, count: int) -> int:
    """The shard (1 to count) an instance belongs to: from a SHA-256 of its canonical IP, so the
    same on every machine and Python (hash() is salted per process), and about count-th each."""
    import hashlib

    digest = hashlib.sha256(canonical_ip(ip).encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") % count + 1


@dataclass(frozen=True)
class Shard:
    """--shard K/N: this run reads only the instances of slice K (from 1) of N."""

    index: int
    count: int

    def holds(self, ip: str) -> bool:
        """Whether this shard reads the instance at ip."""
        return shard_of(ip, self.count) == self.index

    def __str__(self) -> str:
        return "%d/%d" % (self.index, self.count)


class MinHealthy:
    """How many healthy instances a service needs: a count (HealthyCount) or a share of its
    instances (HealthyShare), one small class each."""

    def required(self, instances: int) -> int:
        """The minimum for a service of this many instances."""
        raise NotImplementedError


@dataclass(frozen=True)
class HealthyCount(MinHealthy):
    """A fixed minimum: '3'."""

    count: int

    def required(self, instances: int) -> int:
        return self.count

    def __str__(self) -> str:
        return str(self.count)


@dataclass(frozen=True)
class HealthyShare(MinHealthy):
    """A share of the service's instances, rounded up as a PodDisruptionBudget's minAvailable
    is: '50%' of 3 instances is 2. Kept as the exact decimal written (no float rounding)."""

    percent: Any  # a fractions.Fraction, 0 to 100

    def required(self, instances: int) -> int:
        return -(-self.percent * instances // 100)  # the ceiling, exactly

    def __str__(self) -> str:
        whole = self.percent.numerator // self.percent.denominator
        return "%s%%" % (whole if self.percent == whole else "%g" % float(self.percent))


@dataclass(frozen=True)
class ExpectedService:
    """A service a policy expects, and what it asks of it beyond the policy's defaults."""

    name: str
    min_healthy: Optional[MinHealthy] = None
    instances: Optional[int] = None  # how many it should have: a share's base, when above those seen
    cpu: Optional[float] = None
    memory: Optional[float] = None


@dataclass(frozen=True)
class Policy:
    """What the fleet should look like: thresholds and a minimum of healthy instances for every
    service, with exceptions for the services it expects (a --policy file; without one, the
    defaults). The one place that says which thresholds and minimum a service has."""

    cpu: float = DEFAULT_THRESHOLD
    memory: float = DEFAULT_THRESHOLD
    min_healthy: MinHealthy = HealthyCount(DEFAULT_MIN_HEALTHY)
    services: Tuple[ExpectedService, ...] = ()
    source: Optional[str] = None  # the file it came from
    by_name: Dict[str, ExpectedService] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {s.name: s for s in self.services})

    def overridden(self, cpu: Optional[float] = None, memory: Optional[float] = None,
                   min_healthy: Optional[MinHealthy] = None) -> "Policy":
        """The policy with the command line's values: an option given beats the file, for every
        service (the most explicit wins)."""
        services = tuple(replace(s, cpu=None if cpu is not None else s.cpu,
                                 memory=None if memory is not None else s.memory,
                                 min_healthy=None if min_healthy is not None else s.min_healthy)
                         for s in self.services)
        return replace(self, services=services, cpu=self.cpu if cpu is None else cpu,
                       memory=self.memory if memory is None else memory,
                       min_healthy=self.min_healthy if min_healthy is None else min_healthy)

    @property
    def expected(self) -> List[str]:
        """The names of the services expected, as written."""
        return [s.name for s in self.services]

    def thresholds(self) -> Thresholds:
        """The thresholds of every service."""
        own = {s.name: Thresholds(self.cpu if s.cpu is None else s.cpu, self.memory if s.memory is None else s.memory)
               for s in self.services if s.cpu is not None or s.memory is not None}
        return Thresholds(self.cpu, self.memory, own)

    def min_healthy_for(self, service: Optional[str], instances: int) -> int:
        """The healthy instances a service of this many instances needs. A share is of the larger
        of those instances and the policy's count for it: an instance that vanished or could not
        be read (so has no service) does not lower the bar."""
        expected = self.by_name.get(service) if service is not None else None
        if expected is None:
            return self.min_healthy.required(instances)
        rule = expected.min_healthy or self.min_healthy
        return rule.required(max(instances, expected.instances or 0))


POLICY_DEFAULTS = "defaults"
POLICY_SERVICE = "service:"
POLICY_KEYS = {  # section kind -> the keys it takes
    POLICY_DEFAULTS: ("min_healthy", "cpu_threshold", "memory_threshold"),
    POLICY_SERVICE: ("min_healthy", "instances", "cpu_threshold", "memory_threshold"),
}
_POLICY_COUNT = re.compile(r"[0-9]{1,9}\Z")
_POLICY_SHARE = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,6})?)\s*%\Z")


def parse_min_healthy(text: str) -> MinHealthy:
    """'3' or '50%' (ValueError naming what is wrong: a negative count, a share over 100%...)."""
    from fractions import Fraction

    text = text.strip()
    if _POLICY_COUNT.match(text):
        return HealthyCount(int(text))
    share = _POLICY_SHARE.match(text)
    if share:
        percent = Fraction(share.group(1))
        if percent > 100:
            raise ValueError("%s is a percentage over 100" % text)
        return HealthyShare(percent)
    if text.startswith("-"):
        raise ValueError("%s is negative: a count is 0 or more" % text)
    raise ValueError("%r is not a count (3) or a percentage of the instances (50%%)" % text)


def _policy_value(key: str, text: str) -> Any:
    """One policy value, by its key; ValueError saying what is wrong."""
    if key == "min_healthy":
        return parse_min_healthy(text)
    if key == "instances":
        if text.strip().startswith("-"):
            raise ValueError("%s is negative: a count is 1 or more" % text.strip())
        if not _POLICY_COUNT.match(text.strip()) or int(text) < 1:
            raise ValueError("%r is not a count of 1 or more" % text)
        return int(text)
    try:
        return parse_percent(text)
    except ValueError:
        raise ValueError("%r is not a percentage from 0 to 100" % text)


_POLICY_LINE_ENDS = re.compile(r"\r\n|\r|\n")  # LF, CRLF and lone CR alike; a form feed is in a line
_POLICY_HEADER_END = re.compile(r"\]\s*(?:[#;]|\Z)")  # the first ']' that only a comment follows
_POLICY_KEY = re.compile(r"([^=:]*)[=:](.*)", re.DOTALL)  # key = value, or key: value
_POLICY_COMMENT = re.compile(r"(?:\A|\s)[#;]")  # a comment after a value starts after white space


def parse_policy(text: str, source: str) -> Policy:
    """A policy file's text (INI): a [defaults] section and a [service:NAME] section per
    expected service; '#' and ';' start comments. Read line by line, in one pass, by hand:
    configparser keeps no line numbers, reads a lone CR as no line end, and reads a name
    with ']' differently from one Python to the next. UsageError naming the file, the line
    and what is wrong, for anything it cannot read."""
    def fail(line: int, message: str) -> NoReturn:
        raise UsageError("policy %s, line %d: %s" % (sanitize(source), line, sanitize(message)))

    sections: List[Tuple[str, int, Dict[str, Tuple[str, int]]]] = []  # (name, line, key -> (value, line))
    seen: Dict[str, int] = {}
    keys: Optional[Dict[str, Tuple[str, int]]] = None
    for number, line in enumerate(_POLICY_LINE_ENDS.split(text), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if stripped[0] == "[":
            end = _POLICY_HEADER_END.search(stripped)
            if end is None:
                fail(number, "a [section] line ends with its ']', and only a comment may follow: %s" % stripped)
            section = stripped[1:end.start()]
            if section in seen:
                fail(number, "[%s] is there twice" % section)
            seen[section] = number
            keys = {}
            sections.append((section, number, keys))
            continue
        if keys is None:
            fail(number, "a key before any [section]: %s" % stripped)
        pair = _POLICY_KEY.match(stripped)
        if pair is None:
            fail(number, "not a [section], a key = value, or a comment: %s" % stripped)
        key, value = pair.group(1).strip().lower(), pair.group(2)
        if key in keys:
            fail(number, "%s in [%s] is there twice" % (key, sections[-1][0]))
        keys[key] = (_POLICY_COMMENT.split(value, 1)[0].strip(), number)
    values: Dict[str, Any] = {}
    services: Dict[str, ExpectedService] = {}
    for section, line, keys in sections:
        if section.startswith(POLICY_SERVICE):
            kind, name = POLICY_SERVICE, section[len(POLICY_SERVICE):].strip()
            if not name:
                fail(line, "[%s] names no service" % section)
            if name in services:
                fail(line, "service %s is there twice" % name)
        elif section == POLICY_DEFAULTS:
            kind, name = POLICY_DEFAULTS, ""
        else:
            fail(line, "unknown section [%s]%s; a policy has [defaults] and [service:NAME] sections"
                 % (section, _suggestion(section.lower(), [POLICY_DEFAULTS, POLICY_SERVICE], 0.5)))
        read: Dict[str, Any] = {}
        for key, (text_value, key_line) in keys.items():
            if key not in POLICY_KEYS[kind]:
                fail(key_line, "unknown key %r in [%s]%s; it takes %s" % (key, section, _suggestion(
                    key, POLICY_KEYS[kind]), ", ".join(POLICY_KEYS[kind])))
            try:
                read[key] = _policy_value(key, text_value)
            except ValueError as error:
                fail(key_line, "%s: %s" % (key, error))
        minimum = read.get("min_healthy")
        if isinstance(minimum, HealthyCount) and read.get("instances", minimum.count) < minimum.count:
            fail(keys["min_healthy"][1], "min_healthy %d is more than its %d instances: it could never be met"
                 % (minimum.count, read["instances"]))
        if kind == POLICY_DEFAULTS:
            values = read
        else:
            services[name] = ExpectedService(name, minimum, read.get("instances"), read.get("cpu_threshold"),
                                             read.get("memory_threshold"))
    defaults = Policy()
    return Policy(cpu=values.get("cpu_threshold", defaults.cpu), memory=values.get("memory_threshold", defaults.memory),
                  min_healthy=values.get("min_healthy", defaults.min_healthy), services=tuple(services.values()),
                  source=source)


@dataclass(frozen=True)
class Options:
    """Everything a command needs to know, built once from the arguments."""

    url: str = DEFAULT_URL
    timeout: float = DEFAULT_TIMEOUT
    deadline: float = DEFAULT_DEADLINE
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
    service_cache: Optional[str] = None  # where the services seen go, for shell completion (terminals only)
    policy: Policy = field(default_factory=Policy)  # thresholds, minimums, expected services
    shard: Optional[Shard] = None
    authorization: Optional[str] = field(default=None, repr=False)  # from credentials in the URL

    @property
    def thresholds(self) -> Thresholds:
        """Every service's thresholds, from the policy."""
        return self.policy.thresholds()



# ---------------------------------------------------------------------------
# Pure analysis: health rule, aggregation, flagging, sorting
# ---------------------------------------------------------------------------


def instance_status(instance: Instance, thresholds: Thresholds) -> str:
    """Healthy, Unhealthy (cpu or memory strictly above its service's threshold) or Unknown."""
    usage = instance.usage()
    if usage is None:
        return UNKNOWN
    cpu, memory = usage
    limits = thresholds.for_service(instance.service)
    if cpu > limits.cpu or memory > limits.memory:
        return UNHEALTHY
    return HEALTHY


def _plural(count: int, noun: str, nouns: Optional[str] = None) -> str:
    """'1 instance', '2 instances': the count and the noun that agrees with it."""
    return "%d %s" % (count, noun if count == 1 else nouns or noun + "s")


def _suggestion(word: str, choices: Sequence[str], cutoff: float = 0.6) -> str:
    """"; did you mean 'x'?" for the closest of choices, or nothing."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return "; did you mean %r?" % sanitize(close[0]) if close else ""


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def service_sort_key(service: Optional[str]) -> Tuple[int, str, str]:
    """Services by name, case-insensitively; the unknown group last."""
    if service is None:
        return (1, "", "")
    return (0, service.lower(), service)


def summarize_services(instances: Iterable[Instance], thresholds: Thresholds) -> List[ServiceSummary]:
    """One summary per service, by name; averages over the instances that could be read."""
    groups: Dict[Optional[str], List[Instance]] = {}
    for instance in instances:
        groups.setdefault(instance.service, []).append(instance)
    summaries = []
    for service in sorted(groups, key=service_sort_key):
        members = groups[service]
        readable = sorted((m for m in members if m.readable), key=lambda m: ip_sort_key(m.ip))
        cpus = [m.cpu for m in readable if m.cpu is not None]
        memories = [m.memory for m in readable if m.memory is not None]
        # max() keeps the first of equals: the lowest IP is the hottest of a tie.
        hottest_cpu = max(readable, key=lambda m: m.cpu or 0.0, default=None)
        hottest_memory = max(readable, key=lambda m: m.memory or 0.0, default=None)
        summaries.append(ServiceSummary(
            service=service,
            instances=len(members),
            healthy=sum(1 for m in members if instance_status(m, thresholds) == HEALTHY),
            avg_cpu=_mean(cpus),
            avg_memory=_mean(memories),
            max_cpu=max(cpus, default=None),
            max_memory=max(memories, default=None),
            max_cpu_ip=hottest_cpu.ip if hottest_cpu else None,
            max_memory_ip=hottest_memory.ip if hottest_memory else None,
        ))
    return summaries


def instance_reasons(instance: Instance, thresholds: Thresholds) -> List[str]:
    """Why an instance is Unhealthy: the resources over their thresholds ([] when it is not;
    an Unknown one's reason is its error)."""
    usage = instance.usage()
    if usage is None:
        return []
    limits = thresholds.for_service(instance.service)
    return [name for name, value, limit in (("cpu", usage[0], limits.cpu), ("memory", usage[1], limits.memory))
            if value > limit]


def filter_statuses(instances: Iterable[Instance], statuses: Sequence[str], thresholds: Thresholds) -> List[Instance]:
    """The instances whose status is one of statuses (lower case); all of them when none is given."""
    if not statuses:
        return list(instances)
    return [i for i in instances if instance_status(i, thresholds).lower() in statuses]


def sort_summaries(summaries: Iterable[ServiceSummary], key: str) -> List[ServiceSummary]:
    """Sort service rows: by name (default), instances (most first), healthy (fewest first), or
    average cpu or memory (highest first, unknown last); ties by name."""
    def by_name(summary: ServiceSummary) -> Tuple:
        return service_sort_key(summary.service)

    if key == "instances":
        return sorted(summaries, key=lambda s: (-s.instances,) + by_name(s))
    if key == "healthy":
        return sorted(summaries, key=lambda s: (s.healthy,) + by_name(s))
    if key in ("cpu", "memory"):
        def by_value(summary: ServiceSummary) -> Tuple:
            value = summary.avg_cpu if key == "cpu" else summary.avg_memory
            return (value is None, -(value or 0.0)) + by_name(summary)
        return sorted(summaries, key=by_value)
    return sorted(summaries, key=by_name)


def with_missing(summaries: Iterable[ServiceSummary], expected: Iterable[str]) -> List[ServiceSummary]:
    """The summaries, and a row of 0 instances for each expected service that has none; by name."""
    summaries = list(summaries)
    present = {s.service for s in summaries}
    missing = [ServiceSummary(name, 0, 0, None, None) for name in expected if name not in present]
    return sorted(summaries + missing, key=lambda s: service_sort_key(s.service)) if missing else summaries


def fleet_summaries(instances: Iterable[Instance], policy: Policy,
                    chosen: Optional[Set[str]] = None) -> List[ServiceSummary]:
    """A summary per service seen, and a row of 0 instances for each expected one that has none
    (of the chosen services, when some are)."""
    expected = [name for name in policy.expected if chosen is None or name in chosen]
    return with_missing(summarize_services(instances, policy.thresholds()), expected)


def flag_services(summaries: Iterable[ServiceSummary], policy: Policy) -> List[ServiceSummary]:
    """Services with fewer healthy instances than the policy's minimum for them, zero included,
    and expected services with no instance (rows of with_missing); worst first, missing first
    among equals."""
    flagged = [s for s in summaries if s.healthy < policy.min_healthy_for(s.service, s.instances) or not s.instances]
    return sorted(flagged, key=lambda s: (s.healthy, s.instances > 0, service_sort_key(s.service)))


def ip_sort_key(ip: str) -> Tuple[int, int, str]:
    """Numeric order: 10.58.1.9 before 10.58.1.10, IPv4 before IPv6."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return (9, 0, ip)
    return (address.version, int(address), ip)


_STATUS_RANK = {UNHEALTHY: 0, UNKNOWN: 1, HEALTHY: 2}


def sort_instances(instances: Iterable[Instance], key: str, thresholds: Thresholds) -> List[Instance]:
    """Sort for display: by service then IP (default), IP, status (worst first), cpu or memory (highest first)."""
    def by_service(instance: Instance) -> Tuple:
        return (service_sort_key(instance.service), ip_sort_key(instance.ip))

    if key == "ip":
        return sorted(instances, key=lambda i: ip_sort_key(i.ip))
    if key == "status":
        return sorted(instances, key=lambda i: (_STATUS_RANK[instance_status(i, thresholds)],) + by_service(i))
    if key in ("cpu", "memory"):
        # Unknown values last; ties by service then IP.
        def by_value(instance: Instance) -> Tuple:
            value = getattr(instance, key)
            return (value is None, -(value or 0.0)) + by_service(instance)
        return sorted(instances, key=by_value)
    return sorted(instances, key=by_service)


def resolve_service(name: str, known: Iterable[str], unreadable: int = 0) -> str:
    """The known service that name means (exact, then case-insensitive). When none is, and some
    instances (unreadable of them) could not be read, ServiceUnreadable: it may be among them;
    when every instance was read, UsageError naming the closest."""
    known = sorted(set(known), key=str.lower)
    if name in known:
        return name
    folded = [service for service in known if service.lower() == name.lower()]
    if len(folded) == 1:
        return folded[0]
    message = "unknown service %r" % sanitize(name)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    if not close:
        lowered = {service.lower(): service for service in known}
        close = [lowered[m] for m in difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.5)]
    if unreadable:
        message = "no readable instance of %r; %s could not be read, it may be among them" % (
            sanitize(name), _plural(unreadable, "instance"))
        raise ServiceUnreadable(message + ("; did you mean %r?" % sanitize(close[0]) if close else ""))
    if close:
        message += " (did you mean %r?)" % sanitize(close[0])
    if known:
        message += "; known services: " + ", ".join(sanitize(service) for service in known)
    else:
        message += "; CPX lists no readable service"
    raise UsageError(message)


_GLOB = re.compile(r"[*?[]")


def _glob_class(body: str) -> str:
    """The regex of a pattern's [seq] or [!seq], by fnmatch's rules: ranges a-z, a reversed
    range matching nothing; every character escaped, so none is read as regex syntax."""
    negate = body[:1] == "!"
    body = body[negate:]
    items, k = [], 0
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
    """A shell-style pattern (* ? [seq] [!seq]) as its '*'-separated parts: each a regex with
    no repetition, and the number of characters it matches. fnmatch's regexes backtrack
    (on Python 3.7 and 3.8, '*a*a*a*a*b' takes minutes against a long name); these cannot."""
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
    """Whether name matches the shell-style pattern, in time linear in the name for each of
    the pattern's parts: the first part at the start, the last at the end, and each between
    at its leftmost place after the one before (the greedy match is the right one for '*')."""
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
    """The known services that names and shell-style patterns ('Pay*') mean, in the order asked,
    each once. A name resolves as resolve_service() does; a pattern matches case-sensitively,
    else in any case; one that matches nothing fails as an unknown name does."""
    known = sorted(set(known), key=str.lower)
    chosen: List[str] = []
    for pattern in patterns:
        matched: List[str] = []
        if _GLOB.search(pattern):
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
    parts = []
    for reason, ips in sorted(by_reason.items(), key=lambda item: (-len(item[1]), item[0])):
        ips = sorted(ips, key=ip_sort_key)
        shown = ", ".join(ips[:IPS_LISTED_PER_REASON])
        if len(ips) > IPS_LISTED_PER_REASON:
            shown += " and %d more" % (len(ips) - IPS_LISTED_PER_REASON)
        parts.append("%s %s" % (reason, shown))
    return "%d of %s could not be read: %s" % (len(failed), _plural(len(instances), "instance"), "; ".join(parts))


# ---------------------------------------------------------------------------
# The CPX client: one opener, timeouts, retries, concurrency control
# ---------------------------------------------------------------------------


class FetchError(Exception):
    """One request failed; reason is short and stable so failures group well. pushback: how the
    server said it is overloaded, as the limiter names it (HTTP 429, or a connection timed out
    in a listen queue that drops SYNs), or None."""

    def __init__(self, reason: str, retryable: bool = False, retry_after: Optional[float] = None,
                 detail: str = "", pushback: Optional[str] = None):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after
        self.detail = detail
        self.pushback = pushback


_URL_SPACE_OR_CONTROL = re.compile(r"[\x00-\x20\x7f]")


def _redacted(url: str) -> str:
    """A URL fit for a message: whatever comes before its last '@' (a user, a password, even
    in a URL too broken to parse) shown as ***, after the scheme."""
    if "@" not in url:
        return url
    before, _, after = url.rpartition("@")
    scheme = re.match(r"[A-Za-z][A-Za-z0-9+.-]*:[/\\]*", before)
    return (scheme.group() if scheme else "") + "***@" + after


def parse_base_url(text: str, source: str = "--url") -> Tuple[str, Optional[str]]:
    """A CPX base URL checked (http or https, a host, nothing that cannot be requested), without
    its trailing slash and without credentials; and the Authorization header the credentials
    make (Basic), or None. UsageError naming where the URL came from, never its password."""
    from urllib.parse import unquote, urlsplit

    text = text.strip()

    def refuse(why: str) -> NoReturn:
        raise UsageError("URL %r (from %s) %s" % (sanitize(_redacted(text)), source, why))

    bad = _URL_SPACE_OR_CONTROL.search(text) or re.search(r"\\", text)
    if not text:
        refuse("is empty")
    if bad:
        refuse({" ": "contains a space", "\\": "contains a backslash"}.get(bad.group(), "contains a control character")
               + " (percent-encode it)")
    try:
        parts = urlsplit(text)
        port = parts.port  # ValueError on a port that is not a number in range
    except ValueError:
        refuse("is not a valid URL (a port must be a number from 0 to 65535)")
    if parts.scheme not in ("http", "https"):
        refuse("must start with http:// or https://")
    if not parts.hostname:
        refuse("has no host")
    if parts.query or parts.fragment:
        refuse("must not have a query or fragment")
    if any(ord(char) > 126 for char in parts.path):
        refuse("has a character that is not ASCII in its path (percent-encode it)")
    host = parts.hostname
    if ":" in host:
        host = "[%s]" % host
    else:
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            refuse("has a host name that cannot be looked up (a label empty or over 63 characters?)")
    netloc = host if port is None else "%s:%d" % (host, port)
    authorization = None
    if parts.username is not None or parts.password is not None:
        import base64

        pair = "%s:%s" % (unquote(parts.username or ""), unquote(parts.password or ""))
        authorization = "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")
    return "%s://%s%s" % (parts.scheme, netloc, parts.path.rstrip("/")), authorization


class RequestGuard:
    """One request's time limit, and the connection to cut when it passes."""

    def __init__(self, give_up_at: float):
        self.give_up_at = give_up_at
        self.lock = threading.Lock()
        self.sock: Optional[socket.socket] = None
        self.fired = False
        self.connect_seconds: Optional[float] = None  # None: never connected

    def connected(self, sock: Optional[socket.socket], seconds: float) -> None:
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
        if self.sock is not None:
            try:
                # The socket level, not ssl's: shutdown wakes a thread blocked in recv.
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
            except OSError:
                pass  # already closed: nothing left to cut


class Watchdog:
    """Cuts requests that outlive their time limit, however the server trickles.

    A socket timeout bounds each read, not a request: a server that sends its
    headers one byte a second, or an endless stream of `100 Continue`, would hold
    a request (and its worker thread) for ever. One thread for all requests: it
    sleeps until the earliest limit, then shuts down the sockets of the requests
    that passed theirs. Limit: a TLS handshake and a DNS lookup are bounded by the
    socket timeout only (the socket is not ours until connect() returns)."""

    SLACK = 0.01  # seconds: limits this close together are handled in one wake-up

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.armed: Set[RequestGuard] = set()
        self.wake_at = float("inf")
        self.thread: Optional[threading.Thread] = None
        self.closing = False
        self.local = threading.local()  # the guard of the request this thread is making

    def arm(self, give_up_at: float) -> RequestGuard:
        """Start guarding the calling thread's next request until give_up_at."""
        guard = RequestGuard(give_up_at)
        self.local.guard = guard
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

    def current(self) -> Optional[RequestGuard]:
        """The guard of the request the calling thread is making, if any."""
        return getattr(self.local, "guard", None)

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
                if earliest is None:
                    self.wake_at = float("inf")
                    self.condition.wait()
                else:
                    self.wake_at = max(earliest, now + self.SLACK)
                    self.condition.wait(self.wake_at - now)


def _build_opener(watchdog: Watchdog):
    """One urllib opener for the process: http(s) only, redirects within one origin, and every
    connection handed to the watchdog guarding its request."""
    import urllib.request
    from urllib.parse import urljoin, urlsplit

    def guarded(connection_class: Any) -> Any:
        def make(host: str, **kwargs: Any) -> Any:
            connection = connection_class(host, **kwargs)
            plain_connect = connection.connect

            def connect() -> None:
                began = time.monotonic()
                plain_connect()
                guard = watchdog.current()
                if guard is not None:
                    guard.connected(connection.sock, time.monotonic() - began)
            connection.connect = connect
            return connection
        return make

    class GuardedConnections:
        """urllib's HTTP(S) handler with connections the watchdog can cut."""

        def do_open(self, http_class, req, **http_conn_args):
            return super().do_open(guarded(http_class), req, **http_conn_args)

    class GuardedHTTPHandler(GuardedConnections, urllib.request.HTTPHandler):
        pass

    def origin(url: str) -> Tuple[str, Optional[str], Optional[int]]:
        parts = urlsplit(url)
        return parts.scheme.lower(), parts.hostname, parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())

    class SameOriginRedirects(urllib.request.HTTPRedirectHandler):
        """Follow a redirect only to the same scheme, host and port (https to http never), so
        that the request's Authorization goes nowhere but where the user sent it."""

        def http_error_302(self, req, fp, code, msg, headers):
            location = headers.get("Location") or headers.get("URI")
            if location:
                try:
                    same = origin(urljoin(req.full_url, location)) == origin(req.full_url)
                except ValueError:  # a port that is not a number
                    same = False
                if not same:
                    fp.close()
                    raise FetchError("redirected to %s, not followed" % sanitize(_redacted(location))[:200])
            return super().http_error_302(req, fp, code, msg, headers)

        http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    # Built by hand rather than with build_opener() so that file:, ftp: and
    # data: handlers are simply absent: no URL or redirect can reach them.
    opener = urllib.request.OpenerDirector()
    handlers = [urllib.request.ProxyHandler(), urllib.request.UnknownHandler(),
                GuardedHTTPHandler(), urllib.request.HTTPDefaultErrorHandler(),
                SameOriginRedirects(), urllib.request.HTTPErrorProcessor()]
    if hasattr(urllib.request, "HTTPSHandler"):
        class GuardedHTTPSHandler(GuardedConnections, urllib.request.HTTPSHandler):
            pass
        handlers.append(GuardedHTTPSHandler())
    for handler in handlers:
        opener.add_handler(handler)
    return opener


def _read_capped(response, cap: int) -> bytes:
    """Read a body of at most cap bytes (the watchdog ends a trickle)."""
    length = response.headers.get("Content-Length")
    if length and length.strip().isdigit() and int(length) > cap:
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
    if byte_count >= 1024 * 1024:
        return "%d MiB" % (byte_count // (1024 * 1024))
    return "%d KiB" % (byte_count // 1024)


def _describe_network_error(error: BaseException) -> FetchError:
    """Map what urllib/http.client/socket raise to a short, groupable reason."""
    import http.client

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
    text = str(reason) or reason.__class__.__name__
    return FetchError(sanitize(text)[:80], retryable=isinstance(reason, OSError))


def backoff_delay(attempt: int, retry_after: Optional[float] = None, rng: Any = random) -> float:
    """Seconds before retry number attempt+1: Retry-After (capped) if given, else jittered exponential."""
    if retry_after is not None:
        return min(retry_after, RETRY_AFTER_CAP)
    # Full jitter: clients that failed together do not retry together.
    return rng.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt))


class ConcurrencyLimit:
    """How many requests may be in flight: here fixed at `limit` (--concurrency fixed).

    Bookkeeping only, with no clock of its own: the caller says when (`now`), so a
    test can replay any sequence. A request counts against the limit while it
    runs; AdaptiveLimit moves the limit and stops counting requests that are stuck.
    start(), finish() and room() are for the one thread that dispatches requests,
    observe() for the worker threads."""

    # What one attempt came to, as observe() is told.
    ANSWERED = "answered"  # a valid answer: its latency is a sample
    REFUSED = "refused"  # HTTP 429: the server asks for fewer requests
    DROPPED = "dropped"  # the connection timed out: a listen queue that drops SYNs
    FAILED = "failed"  # anything else (an error answer, a timeout, the deadline): not a sample

    def __init__(self, limit: int):
        self.lock = threading.Lock()
        self.limit = limit
        self.peak = limit
        self.running: OrderedDict[int, float] = OrderedDict()  # ticket -> start; these count
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

    def observe(self, ticket: int, outcome: str, latency: float = 0.0, connect: Optional[float] = None) -> None:
        """Learn from one attempt of a request: its outcome, latency and connect time (None: no
        connection was made)."""

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
    """Requests in flight, adapted to what the server can take, up to a ceiling.

    Only valid answers teach latency: an error, a timeout or the deadline is an
    outcome of one instance and says nothing of queueing (a fast HTTP 500 once
    taught a best latency near 0 s, and the limit fell to 1 for good).

    The base is the server's latency when nothing queues, measured where nothing
    can: the burst that opens a batch of reads on an idle server. It is the
    median of the burst's requests (one that failed or got stuck counts as
    slow), so that a few odd instances cannot set it, and it is measured anew
    in every batch (every track sample): nothing learnt is for good.

    A request running for STUCK_RATIO times the base (at least STUCK_FLOOR) is
    stuck: it stops counting against the limit and its answer is no sample.
    Slow is not congestion: hung or slow instances wait out their time side by
    side, in up to STUCK_ROOM x the ceiling more threads, instead of starving
    the rest of the fleet, and half the fleet at 700 ms teaches nothing.

    A round is `limit` answers (at least ROUND_ANSWERS). Queueing is latency
    that rises with concurrency: a round's lower quartile over the base. A flat
    round grows the limit (fourfold per round at first, answer by answer as in
    TCP's slow start, once the start proved flat; by an eighth per round
    later); over QUEUEING_RATIO the limit scales down by that ratio. Growth also
    needs clean evidence (see GROWTH_MIN_BASE and _can_grow): the client's own
    noise must not pass for a server that takes more.

    Pushback halves the limit, once per limit's worth of outcomes: HTTP 429
    (regained at double per flat round once it stops, since one sick instance
    can answer it), or a connection whose SYN was dropped (a listen queue
    overflowing: the server is full, so growth goes on by an eighth only).
    """

    INITIAL = 5  # in flight at first: never overflows a listen backlog of 5
    GROWTH_FACTOR = 4  # per round, in slow start
    PROBE_DIVISOR = 8  # after slow start, grow by limit / 8 per flat round
    FLAT_RATIO = 1.5  # a round's lower quartile within this of the base: flat
    QUEUEING_RATIO = 2.5  # over this: requests are queueing at the server
    # The first growth decides whether a server takes concurrency at all, so the
    # start must be flatter, for rounds worth STARTUP_EVIDENCE_SECONDS of latency:
    # one round at 20 ms, four at 5 ms. And never below GROWTH_MIN_BASE: there the
    # client's own cost (about 0.5 ms of CPU a request, 1-5 ms of latency under
    # load) hides any queueing (measured against the single-threaded simulator:
    # 1-3 ms at 5 in flight, as flat as a concurrent server, until the 8th in
    # flight overflows its listen backlog and waits 1 s), and 5 in flight
    # already keep the client busy (5 / 2.5 ms is about what it can send).
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

    def observe(self, ticket: int, outcome: str, latency: float = 0.0, connect: Optional[float] = None) -> None:
        with self.lock:
            self.cut_guard -= 1
            if outcome == self.ANSWERED and connect is not None:
                if connect > self.CONNECT_STALL_SECONDS and connect > self.CONNECT_STALL_RATIO * self.best_connect:
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
        answered = sorted(seconds for seconds in self.burst.values() if seconds is not None and seconds != float("inf"))
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
        if self.slow_start and not self.proving and self._can_grow() and latency <= self.FLAT_RATIO * self.base:
            # As TCP's slow start: more for each answer that did not queue, so the limit
            # grows fourfold in a round however long the round's slowest answers take.
            self.limit = min(self.ceiling, self.limit + self.GROWTH_FACTOR - 1)
            self.peak = max(self.peak, self.limit)
        # A round is at least ROUND_ANSWERS long once it can cut the limit; the first
        # round only decides whether to grow: the sooner the better.
        if len(self.round) >= (self.limit if self.proving else max(self.limit, self.ROUND_ANSWERS)):
            latencies = sorted(self.round)
            self._end_round(latencies[len(latencies) // 4], latencies[len(latencies) * 3 // 4], self.base)

    def _end_round(self, quartile: float, upper_quartile: float, base: float) -> None:
        self.round = []
        ratio = quartile / base
        # When every answer slows down, a request is stuck because the server queues:
        # it counts again, or the limit would not bound what the server is sent.
        self.congested = ratio > self.FLAT_RATIO
        if self.congested:
            self.proving = self.slow_start = False  # the first round that is not flat ends slow start
            if ratio > self.QUEUEING_RATIO:
                # Keep about twice what the server serves at its base latency:
                # enough to keep it busy, not enough to overflow its queue.
                self._set(int(self.limit * 2 / ratio) + 1)
            return
        if self.limit < self.recovery:
            if self.cut_guard <= 0:
                self._set(min(self.recovery, self.limit * 2))
            return
        self.recovery = 0
        # Growth also needs the round's answers close together: the client's own noise
        # spreads those of a server that answers one at a time (0.5-12 ms under load,
        # measured), and more in flight would overflow its backlog.
        tight = upper_quartile <= self.FLAT_RATIO * base
        if self.proving and (ratio > self.FIRST_ROUND_RATIO or not tight):
            self.proving = self.slow_start = False
        elif self.proving:
            self._flat_start(quartile)
        elif not self.slow_start and tight and self._can_grow():
            self._set(self.limit + max(1, self.limit // self.PROBE_DIVISOR))

    def _can_grow(self) -> bool:
        """Whether more in flight can help: not where the client's own cost hides any queue,
        nor while answers far faster than the base (a server idle between the client's
        hiccups: 0.5 ms answers against a 5 ms median, measured under load) say it is noise."""
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
        self.base_url = options.url
        self.watchdog = Watchdog()
        self.opener = _build_opener(self.watchdog)
        self.limiter = AdaptiveLimit(options.workers) if options.adaptive else ConcurrencyLimit(options.workers)
        self.retried = 0  # retries made, for -v; workers add to it under the lock
        self.retried_lock = threading.Lock()
        # One more thread than requests may be in flight: /servers never waits for a free one.
        self.executor = ThreadPoolExecutor(max_workers=self.limiter.capacity + 1)
        self.headers = {"Accept": "application/json", "User-Agent": "cpx_devops/" + __version__}
        if options.authorization is not None:
            self.headers["Authorization"] = options.authorization

    def close(self) -> None:
        """Let go of the worker threads without waiting for requests still in flight."""
        self.executor.shutdown(wait=False)
        self.watchdog.close()

    def _get_once(self, url: str, cap: int, deadline: float) -> Tuple[bytes, Optional[float]]:
        """One attempt: the body and the seconds it took to connect; FetchError if it failed.
        --timeout bounds the attempt's whole life (connect, headers, body), as the deadline does."""
        import http.client
        import urllib.error
        import urllib.request

        started = time.monotonic()
        give_up_at = min(started + self.options.timeout, deadline)
        if give_up_at <= started:
            raise FetchError("deadline")
        # When the command's deadline comes before this request's own timeout,
        # running out of time is the deadline's doing, and is said so.
        late = FetchError("timeout", retryable=True) if give_up_at < deadline else FetchError("deadline")
        request = urllib.request.Request(url, headers=self.headers)
        guard = self.watchdog.arm(give_up_at)
        try:
            with self.opener.open(request, timeout=give_up_at - started) as response:
                body = _read_capped(response, cap)
        except urllib.error.HTTPError as error:
            status = error.code
            detail = ""
            try:
                detail = error.read(200).decode("utf-8", "replace")
            except (OSError, ValueError):  # the error body is only decoration
                pass
            finally:
                error.close()
            raise FetchError("HTTP %d" % status, retryable=status in RETRYABLE_HTTP_STATUSES,
                             retry_after=parse_retry_after(error.headers.get("Retry-After")),
                             detail=sanitize(" ".join(detail.split()))[:120],
                             pushback=ConcurrencyLimit.REFUSED if status == 429 else None)
        except FetchError:
            raise
        except (OSError, http.client.HTTPException, UnicodeError) as error:
            # The network's and HTTP's failures only (URLError and socket.timeout are
            # OSErrors; UnicodeError: a host IDNA cannot encode): a programming error
            # must surface, not become an instance's "Unknown (...)".
            failure = _describe_network_error(error)
            if guard.fired or failure.reason == "timeout":
                # Out of time; before a connection was even made: a listen queue that
                # drops SYNs (or a host gone), which the limiter must hear of.
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
        """GET base_url+path and decode JSON, retrying what is worth retrying before the deadline;
        ticket: the limiter's, to tell it how each attempt went (instance requests only)."""
        url = self.base_url + path
        limiter = self.limiter
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                body, connect_seconds = self._get_once(url, cap, deadline)
            except FetchError as error:
                if ticket is not None:
                    limiter.observe(ticket, error.pushback or limiter.FAILED)
                if not error.retryable or attempt >= self.options.retries:
                    raise
                delay = backoff_delay(attempt, error.retry_after)
                if time.monotonic() + delay >= deadline:
                    raise
                time.sleep(delay)
                attempt += 1
                with self.retried_lock:
                    self.retried += 1
                continue
            if ticket is not None:
                limiter.observe(ticket, limiter.ANSWERED, time.monotonic() - started, connect_seconds)
            break
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise FetchError("not JSON")

    def read_instance(self, ip: str, deadline: float, ticket: Optional[int] = None) -> Instance:
        """One instance; any failure becomes an Unknown instance with its reason."""
        try:
            payload = self.get_json("/" + ip, INSTANCE_BODY_CAP, deadline, ticket)
        except FetchError as error:
            return Instance(ip, error=error.reason)
        return parse_instance(ip, payload)

    def list_servers(self, deadline: float) -> ServerList:
        """The fleet from /servers; CpxUnavailable when it cannot be read or is not a list."""
        from concurrent.futures import TimeoutError as FutureTimeout

        url = self.base_url + "/servers"
        # Run in a worker so that even a hanging DNS lookup cannot outlive the deadline.
        future = self.executor.submit(self.get_json, "/servers", SERVERS_BODY_CAP, deadline)
        try:
            payload = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            raise CpxUnavailable("GET %s: no answer within the deadline" % url)
        except FetchError as error:
            # The watchdog cuts the request at the deadline, a moment before the wait
            # above gives up: whichever comes first, the user reads the same words.
            if error.reason == "deadline":
                raise CpxUnavailable("GET %s: no answer within the deadline" % url)
            detail = ": " + error.detail if error.detail else ""
            raise CpxUnavailable("GET %s: %s%s" % (url, error.reason, detail))
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
        return replace(servers, ips=mine, other_shards=len(servers.ips) - len(mine))

    def read_instances(self, ips: Sequence[str], deadline: float) -> List[Instance]:
        """All the given instances, concurrently within the limit; late ones are Unknown (deadline)."""
        import queue

        results: Dict[str, Instance] = {}
        waiting = list(reversed(ips))
        # Finished futures arrive on a queue: one wake-up per answer, where
        # concurrent.futures.wait() would lock every future in flight each time.
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
        for future, (ip, ticket) in in_flight.items():
            future.cancel()  # one still running is cut by the watchdog at the deadline
            limiter.finish(ticket)
            results[ip] = Instance(ip, error="deadline")
        for ip in waiting:
            results[ip] = Instance(ip, error="deadline")
        return [results[ip] for ip in ips]


# ---------------------------------------------------------------------------
# Renderers: table, json, csv, prometheus; sanitising of server text
# ---------------------------------------------------------------------------

# What a terminal must never be sent from a server: control characters (C0, DEL,
# C1 with the 8-bit CSI), which move the cursor or recolour the screen; every format
# character (category Cf: bidirectional controls that reorder what an SRE reads,
# zero-width ones); every default-ignorable code point (invisible: 'Auth\u034fService'
# would pass for AuthService); line and paragraph separators; lone surrogates, which
# no encoding can write. Written out as ranges (Unicode 15.1's Cf, plus
# DerivedCoreProperties' Default_Ignorable_Code_Point), so that every Python gives the
# same answer; the tests check it against this Python's own unicodedata. Limit:
# variation selectors are among them, so an emoji's U+FE0F shows as '?'.
_UNSAFE_TEXT = re.compile(
    "[\x00-\x1f\x7f-\x9f\xad\u034f\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u115f-\u1160"
    "\u17b4-\u17b5\u180b-\u180f\u200b-\u200f\u2028-\u202e\u2060-\u206f\u3164\ud800-\udfff\ufe00-\ufe0f"
    "\ufeff\uffa0\ufff0-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0000-\U000e0fff]")

COLORS = {UNHEALTHY: "31", UNKNOWN: "33", "stale": "2"}


def sanitize(text: Any) -> str:
    """Server text made safe for a terminal: each unsafe character (above) becomes '?'."""
    return _UNSAFE_TEXT.sub("?", str(text))


_UNSAFE_OR_BACKSLASH = re.compile("\\\\|" + _UNSAFE_TEXT.pattern)


def escape_unsafe(text: str) -> str:
    """Server text made safe but kept distinct: each unsafe character as a \\x, \\u or \\U
    escape, and a backslash doubled, so two names never come out alike (Prometheus labels)."""
    def escape(match: Any) -> str:
        char = match.group()
        if char == "\\":
            return "\\\\"
        code = ord(char)
        return "\\x%02x" % code if code < 0x100 else "\\u%04x" % code if code < 0x10000 else "\\U%08x" % code
    return _UNSAFE_OR_BACKSLASH.sub(escape, text)


# Hangul vowels and final consonants (conjoining jamo) join the syllable before them.
_ZERO_WIDTH_JAMO = re.compile("[\u1160-\u11ff\ud7b0-\ud7ff]")


def display_width(text: str) -> int:
    """Columns text takes on a terminal: wide characters count 2; combining marks, format
    and unsafe characters, and conjoining jamo 0."""
    if text.isascii() and text.isprintable():  # the usual case, at C speed
        return len(text)
    width = 0
    for char in text:
        # The unsafe characters include every format character (Cf).
        if unicodedata.category(char) in ("Mn", "Me") or _UNSAFE_TEXT.match(char) or _ZERO_WIDTH_JAMO.match(char):
            continue
        width += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return width


def paint(text: str, status: str, color: bool) -> str:
    """Wrap text in the colour of a status when colour is on."""
    code = COLORS.get(status)
    if not color or not code:
        return text
    return "\x1b[%sm%s\x1b[0m" % (code, text)


def render_table(titles: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool],
                 colors: Optional[Sequence[Optional[str]]] = None, color: bool = False,
                 headers: bool = True) -> str:
    """An org-style table; right marks right-aligned columns, colors gives a status per row."""
    widths = [display_width(title) for title in titles]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], display_width(cell))

    def line(cells: Sequence[str], status: Optional[str] = None) -> str:
        padded = []
        for index, cell in enumerate(cells):
            gap = " " * (widths[index] - display_width(cell))
            text = gap + cell if right[index] else cell + gap
            padded.append(paint(text, status, color) if status else text)
        return "| " + " | ".join(padded) + " |"

    lines = [line(titles), "|" + "+".join("-" * (w + 2) for w in widths) + "|"] if headers else []
    for index, row in enumerate(rows):
        lines.append(line(row, colors[index] if colors else None))
    return "".join(line + "\n" for line in lines)


def shown_percent(value: float, decimals: int, threshold: Optional[float] = None) -> str:
    """value with this many decimals, or as many more as it takes (up to 3) for the text to
    stay on the value's side of the threshold and of 100: an Unhealthy 90.004 never reads as
    90.0 (at the threshold, so healthy), nor 99.999 as 100. Past 3 decimals, rounded
    towards the value's side instead (90.0000001 reads 90.001)."""
    def same_side(shown: float) -> bool:
        return ((threshold is None or (shown > threshold) == (value > threshold))
                and (shown >= 100) == (value >= 100))

    for places in range(decimals, max(decimals, 3) + 1):
        text = "%.*f" % (places, value)
        if same_side(float(text)):
            return text
    import math

    for rounded in (math.floor(value * 1000) / 1000, math.ceil(value * 1000) / 1000):
        if same_side(rounded):
            return "%.3f" % rounded
    return text  # not reached: one of the two is on the value's side


def format_percents(values: Sequence[Optional[float]], threshold: Any = None) -> List[str]:
    """One precision for a whole column: whole numbers when all are, else one decimal (more
    for a value that rounding would carry across the threshold, see shown_percent). threshold:
    one for the column, or a list with one per value (services with thresholds of their own)."""
    known = [v for v in values if v is not None]
    decimals = 0 if all(float(v).is_integer() for v in known) else 1
    limits = threshold if isinstance(threshold, list) else [threshold] * len(values)
    return ["-" if v is None else shown_percent(v, decimals, limits[k]) + "%" for k, v in enumerate(values)]


def _json_number(value: Optional[float], threshold: Optional[float] = None) -> Optional[float]:
    """A percentage for json and csv: an int when whole, else at most 2 decimals (more where
    they decide, as in tables)."""
    if value is None:
        return None
    if float(value).is_integer():
        return int(value)
    return float(shown_percent(value, 2, threshold))


def _marked(cell: str, value: Optional[float], threshold: float) -> str:
    """A value above its threshold gets a '!', so it shows without colour too."""
    return cell + "!" if value is not None and value > threshold else cell


def instance_record(instance: Instance, thresholds: Thresholds) -> Dict[str, Any]:
    """The json/csv fields of an instance (reasons: the resources over their thresholds)."""
    limits = thresholds.for_service(instance.service)
    return {"ip": instance.ip, "service": instance.service,
            "status": instance_status(instance, thresholds),
            "cpu": _json_number(instance.cpu, limits.cpu),
            "memory": _json_number(instance.memory, limits.memory),
            "error": instance.error, "reasons": instance_reasons(instance, thresholds)}


def summary_record(summary: ServiceSummary, thresholds: Thresholds) -> Dict[str, Any]:
    """The json/csv fields of a service summary."""
    limits = thresholds.for_service(summary.service)
    return {"service": summary.service, "instances": summary.instances, "healthy": summary.healthy,
            "avg_cpu": _json_number(summary.avg_cpu, limits.cpu),
            "avg_memory": _json_number(summary.avg_memory, limits.memory),
            "max_cpu": _json_number(summary.max_cpu, limits.cpu),
            "max_memory": _json_number(summary.max_memory, limits.memory),
            "max_cpu_ip": summary.max_cpu_ip, "max_memory_ip": summary.max_memory_ip}


def flagged_record(summary: ServiceSummary, policy: Policy) -> Dict[str, Any]:
    """The json/csv fields of a flagged service: missing when it is expected and has no instance."""
    return {"service": summary.service, "healthy": summary.healthy, "instances": summary.instances,
            "min_healthy": policy.min_healthy_for(summary.service, summary.instances),
            "missing": summary.instances == 0}


def render_json(records: Sequence[Dict[str, Any]]) -> str:
    """One JSON document."""
    return json.dumps(list(records), indent=2) + "\n"


def csv_cell(value: Any) -> str:
    """One csv cell: None empty, text sanitised, and text that a spreadsheet would run as a
    formula (starting with = + - or @) prefixed with ' (OWASP's rule against CSV injection)."""
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
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(fieldnames)
    for record in records:
        writer.writerow([csv_cell(record[name]) for name in fieldnames])
    return buffer.getvalue()


def service_label(service: Optional[str]) -> str:
    """How a service name is shown in a table."""
    return "(unknown)" if service is None else sanitize(service)


def status_label(instance: Instance, thresholds: Thresholds) -> str:
    """Status as shown in a table, with the reason for Unknown."""
    status = instance_status(instance, thresholds)
    return "%s (%s)" % (status, sanitize(instance.error)) if instance.error else status


# New fields go at the end, so that a csv column keeps its place from one version to the next.
INSTANCE_FIELDS = ("ip", "service", "status", "cpu", "memory", "error", "reasons", "time")
SUMMARY_FIELDS = ("service", "instances", "healthy", "avg_cpu", "avg_memory", "max_cpu", "max_memory",
                  "max_cpu_ip", "max_memory_ip", "time", "min_healthy")
FLAGGED_FIELDS = ("service", "healthy", "instances", "time", "min_healthy", "missing")


def fleet_footer(instances: Sequence[Instance], thresholds: Thresholds) -> str:
    """The line under a table: how many instances, services, unhealthy and unknown ones."""
    statuses = [instance_status(i, thresholds) for i in instances]
    services = {i.service for i in instances if i.service is not None}
    text = "%s, %s, %d unhealthy" % (_plural(len(instances), "instance"), _plural(len(services), "service"),
                                     statuses.count(UNHEALTHY))
    if statuses.count(UNKNOWN):
        text += ", %d unknown" % statuses.count(UNKNOWN)
    return text + "\n"


def prometheus_label(value: Optional[str]) -> str:
    """A label value for the exposition format: unsafe characters escaped, not replaced, so
    that two services never share a series; then \\, \" and newline escaped as the format asks."""
    text = escape_unsafe(value) if value is not None else ""
    return text.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _prometheus_number(value: float, places: Optional[int] = 6) -> str:
    """A sample value: an int when whole, else the float, rounded to places unless None."""
    if places is not None:
        value = round(value, places)
    return str(int(value)) if value.is_integer() else repr(value)


PROMETHEUS_FAMILIES = (
    ("cpx_instance_cpu_ratio", "CPU use of an instance, 0-1 (absent when it could not be read)."),
    ("cpx_instance_memory_ratio", "Memory use of an instance, 0-1 (absent when it could not be read)."),
    ("cpx_instance_healthy", "1 when the instance is Healthy (cpu and memory at or under their thresholds)."),
    ("cpx_instance_up", "1 when the instance could be read, 0 when it could not or its data was invalid."),
    ("cpx_service_instances", "Instances of a service (0 for an expected service that has none)."),
    ("cpx_service_healthy_instances", "Healthy instances of a service (0 for an expected service that has none)."),
    ("cpx_service_min_healthy_instances", "Healthy instances a service needs: its policy's minimum."),
    ("cpx_service_expected", "1 for every service the policy expects, whether or not it has instances."),
    ("cpx_service_flagged", "1 when unhealthy flags the service (under its minimum, or expected and missing), else 0."),
    ("cpx_service_threshold_ratio", "A service's threshold, 0-1, by resource: its instances are Unhealthy above it."),
    ("cpx_threshold_ratio", "The default threshold, 0-1, by resource (cpu, memory), of services without their own."),
    ("cpx_scrape_duration_seconds", "How long reading CPX took."),
    ("cpx_scrape_errors", "Instances that could not be read in this scrape."),
)


def _labels(pairs: Sequence[Tuple[str, Optional[str]]]) -> str:
    """{name="value",...} with the values escaped, or nothing for no label."""
    return "{%s}" % ",".join('%s="%s"' % (name, prometheus_label(value)) for name, value in pairs) if pairs else ""


def render_prometheus(snapshot: Snapshot, policy: Policy, per_instance: bool = True,
                      flagged: Optional[Sequence[ServiceSummary]] = None, shard: Optional[Shard] = None,
                      chosen: Optional[Set[str]] = None) -> str:
    """The text exposition format: HELP and TYPE per family, escaped labels, no timestamps.
    Every service the policy expects (of the chosen ones, if any) has its series, instances
    or not, so none vanishes; flagged (unhealthy's verdict) adds cpx_service_flagged; under
    --shard every series has a shard label, so that the shards' slices never collide."""
    thresholds = policy.thresholds()
    tail = (("shard", str(shard)),) if shard is not None else ()
    samples: Dict[str, List[str]] = {name: [] for name, _ in PROMETHEUS_FAMILIES}

    def add(name: str, pairs: Sequence[Tuple[str, Optional[str]]], value: str) -> None:
        samples[name].append(_labels(tuple(pairs) + tail) + " " + value)

    instances = sort_instances(snapshot.instances, "service", thresholds)
    if per_instance:
        for instance in instances:
            labels = _labels((("ip", instance.ip), ("service", instance.service)) + tail) + " "
            status = instance_status(instance, thresholds)
            usage = instance.usage()
            if usage is not None:
                samples["cpx_instance_cpu_ratio"].append(labels + _prometheus_number(usage[0] / 100.0, None))
                samples["cpx_instance_memory_ratio"].append(labels + _prometheus_number(usage[1] / 100.0, None))
            samples["cpx_instance_healthy"].append(labels + "%d" % (status == HEALTHY))
            samples["cpx_instance_up"].append(labels + "%d" % instance.readable)
    expected = set(policy.expected)
    flagged_services = {s.service for s in flagged or ()}
    for summary in fleet_summaries(instances, policy, chosen):
        if summary.service is None:
            continue  # unreadable instances count in cpx_scrape_errors and cpx_instance_up
        service = (("service", summary.service),)
        add("cpx_service_instances", service, "%d" % summary.instances)
        add("cpx_service_healthy_instances", service, "%d" % summary.healthy)
        add("cpx_service_min_healthy_instances", service, "%d" % policy.min_healthy_for(summary.service,
                                                                                         summary.instances))
        if summary.service in expected:
            add("cpx_service_expected", service, "1")
        if flagged is not None:
            add("cpx_service_flagged", service, "%d" % (summary.service in flagged_services))
        limits = thresholds.for_service(summary.service)
        for resource, limit in (("cpu", limits.cpu), ("memory", limits.memory)):
            add("cpx_service_threshold_ratio", service + (("resource", resource),), _prometheus_number(limit / 100.0))
    for resource, limit in (("cpu", thresholds.cpu), ("memory", thresholds.memory)):
        add("cpx_threshold_ratio", (("resource", resource),), _prometheus_number(limit / 100.0))
    add("cpx_scrape_duration_seconds", (), _prometheus_number(snapshot.seconds))
    add("cpx_scrape_errors", (), "%d" % sum(1 for i in instances if not i.readable))
    lines = []
    for name, help_text in PROMETHEUS_FAMILIES:
        if not samples[name]:
            continue
        lines += ["# HELP %s %s" % (name, help_text), "# TYPE %s gauge" % name]
        lines += [name + sample for sample in samples[name]]
    return "\n".join(lines) + "\n"


class Report:
    """A snapshot command's result, ready for every format: the one place where a result
    becomes table, json, csv or Prometheus (commands never ask which format is wanted).
    One small class per command; each format computes only what it shows."""

    TITLES: Sequence[str] = ()  # the table's columns
    RIGHT: Sequence[bool] = ()  # which of them are right-aligned
    WIDE_TITLES: Sequence[str] = ()  # the columns -o wide adds
    WIDE_RIGHT: Sequence[bool] = ()  # which of them are right-aligned (none, unless said)
    FIELDS: Sequence[str] = ()  # the json/csv fields
    PER_INSTANCE = False  # Prometheus: the instance families too, or per service only

    def __init__(self, snapshot: Snapshot, policy: Policy, shard: Optional[Shard] = None,
                 chosen: Optional[Set[str]] = None):
        self.snapshot = snapshot  # its instances: those of the chosen services (all, when None)
        self.policy = policy
        self.thresholds = policy.thresholds()
        self.shard = shard
        self.chosen = chosen

    def rows(self, wide: bool = False) -> List[List[str]]:
        """The table's rows (with the wide columns when wide)."""
        raise NotImplementedError

    def records(self) -> List[Dict[str, Any]]:
        """The json/csv records, each with the snapshot's time, their fields in FIELDS' order."""
        records = []
        for record in self.untimed_records():
            record["time"] = self.snapshot.started
            records.append({name: record[name] for name in self.FIELDS})
        return records

    def untimed_records(self) -> List[Dict[str, Any]]:
        """The json/csv records but their time."""
        raise NotImplementedError

    def statuses(self) -> Optional[List[str]]:
        """A status per row, for its colour."""
        return None

    def footer(self) -> str:
        """The line under a table with headers."""
        return ""

    def empty(self) -> Optional[str]:
        """What a table with no row says instead, if anything."""
        return None

    def render(self, options: Options) -> str:
        """The report in options.output's format."""
        return _REPORT_FORMATS[options.output](self, options)

    def as_table(self, options: Options, wide: bool = False) -> str:
        rows = self.rows(wide)
        empty = self.empty()
        if not rows and empty is not None:
            return empty
        titles = tuple(self.TITLES) + (tuple(self.WIDE_TITLES) if wide else ())
        right = tuple(self.RIGHT) + (tuple(self.WIDE_RIGHT or (False,) * len(self.WIDE_TITLES)) if wide else ())
        table = render_table(titles, rows, right, self.statuses(), options.color, options.headers)
        return table + self.footer() if options.headers else table

    def as_wide(self, options: Options) -> str:
        return self.as_table(options, wide=True)

    def as_json(self, options: Options) -> str:
        return render_json(self.records())

    def as_csv(self, options: Options) -> str:
        return render_csv(self.FIELDS, self.records(), options.headers)

    def flagged(self) -> Optional[Sequence[ServiceSummary]]:
        """The services this command flags, for cpx_service_flagged; None when it judges none."""
        return None

    def as_prometheus(self, options: Options) -> str:
        return render_prometheus(self.snapshot, self.policy, self.PER_INSTANCE, self.flagged(), self.shard,
                                 self.chosen)


_REPORT_FORMATS = {"table": Report.as_table, "wide": Report.as_wide, "json": Report.as_json, "csv": Report.as_csv,
                   "prometheus": Report.as_prometheus}


class InstancesReport(Report):
    """services: a row per instance, in the order given, and the fleet's footer."""

    TITLES = ("IP", "Service", "Status", "CPU", "Memory")
    RIGHT = (False, False, False, True, True)
    WIDE_TITLES = ("Over threshold",)
    FIELDS = INSTANCE_FIELDS
    PER_INSTANCE = True

    def __init__(self, instances: Sequence[Instance], snapshot: Snapshot, policy: Policy,
                 shard: Optional[Shard] = None, chosen: Optional[Set[str]] = None):
        super().__init__(snapshot, policy, shard, chosen)
        self.instances = instances

    def rows(self, wide: bool = False) -> List[List[str]]:
        thresholds = self.thresholds
        limits = [thresholds.for_service(i.service) for i in self.instances]
        cpus = format_percents([i.cpu for i in self.instances], [t.cpu for t in limits])
        memories = format_percents([i.memory for i in self.instances], [t.memory for t in limits])
        rows = []
        for index, instance in enumerate(self.instances):
            row = [sanitize(instance.ip), service_label(instance.service), status_label(instance, thresholds),
                   _marked(cpus[index], instance.cpu, limits[index].cpu),
                   _marked(memories[index], instance.memory, limits[index].memory)]
            if wide:
                reasons = instance_reasons(instance, thresholds)
                row.append(", ".join(reasons) if reasons else "-")
            rows.append(row)
        return rows

    def untimed_records(self) -> List[Dict[str, Any]]:
        return [instance_record(i, self.thresholds) for i in self.instances]

    def statuses(self) -> Optional[List[str]]:
        return [instance_status(i, self.thresholds) for i in self.instances]

    def footer(self) -> str:
        return fleet_footer(self.instances, self.thresholds)


class SummariesReport(Report):
    """status: a row per service (an expected service with no instance too), and the fleet's footer."""

    TITLES = ("Service", "Instances", "Healthy", "Avg CPU", "Max CPU", "Avg Memory", "Max Memory")
    RIGHT = (False, True, True, True, True, True, True)
    WIDE_TITLES = ("Min healthy", "Max CPU at", "Max Memory at")
    WIDE_RIGHT = (True, False, False)
    FIELDS = SUMMARY_FIELDS

    def __init__(self, summaries: Sequence[ServiceSummary], snapshot: Snapshot, policy: Policy,
                 shard: Optional[Shard] = None, chosen: Optional[Set[str]] = None):
        super().__init__(snapshot, policy, shard, chosen)
        self.summaries = summaries

    def rows(self, wide: bool = False) -> List[List[str]]:
        limits = [self.thresholds.for_service(s.service) for s in self.summaries]
        cpu, memory = [t.cpu for t in limits], [t.memory for t in limits]
        columns = [format_percents([s.avg_cpu for s in self.summaries], cpu),
                   format_percents([s.max_cpu for s in self.summaries], cpu),
                   format_percents([s.avg_memory for s in self.summaries], memory),
                   format_percents([s.max_memory for s in self.summaries], memory)]
        rows = []
        for k, s in enumerate(self.summaries):
            name = service_label(s.service) + (" (missing)" if not s.instances else "")
            row = [name, str(s.instances), str(s.healthy), _marked(columns[0][k], s.avg_cpu, cpu[k]),
                   _marked(columns[1][k], s.max_cpu, cpu[k]), _marked(columns[2][k], s.avg_memory, memory[k]),
                   _marked(columns[3][k], s.max_memory, memory[k])]
            if wide:
                row += [str(self.policy.min_healthy_for(s.service, s.instances)), sanitize(s.max_cpu_ip or "-"),
                        sanitize(s.max_memory_ip or "-")]
            rows.append(row)
        return rows

    def untimed_records(self) -> List[Dict[str, Any]]:
        policy = self.policy
        return [dict(summary_record(s, self.thresholds), min_healthy=policy.min_healthy_for(s.service, s.instances))
                for s in self.summaries]

    def statuses(self) -> Optional[List[str]]:
        return [UNHEALTHY if not s.instances else "" for s in self.summaries]  # a missing service in red

    def footer(self) -> str:
        return fleet_footer(self.snapshot.instances, self.thresholds)


def flag_problem(summary: ServiceSummary) -> str:
    """Why unhealthy flags a service, in a word or two."""
    if not summary.instances:
        return "missing"
    return "unreadable" if summary.service is None else "below minimum"


class FlaggedReport(Report):
    """unhealthy: a row per flagged service, worst first; a sentence when there is none."""

    TITLES = ("Service", "Healthy", "Instances", "Minimum", "Problem")
    RIGHT = (False, True, True, True, False)
    FIELDS = FLAGGED_FIELDS

    def __init__(self, flagged: Sequence[ServiceSummary], snapshot: Snapshot, policy: Policy,
                 shard: Optional[Shard] = None):
        super().__init__(snapshot, policy, shard)
        self.services = flagged

    def rows(self, wide: bool = False) -> List[List[str]]:
        return [[service_label(s.service), str(s.healthy), str(s.instances),
                 str(self.policy.min_healthy_for(s.service, s.instances)), flag_problem(s)] for s in self.services]

    def untimed_records(self) -> List[Dict[str, Any]]:
        return [flagged_record(s, self.policy) for s in self.services]

    def statuses(self) -> Optional[List[str]]:
        return [UNHEALTHY] * len(self.services)

    def flagged(self) -> Optional[Sequence[ServiceSummary]]:
        return self.services

    def empty(self) -> Optional[str]:
        policy = self.policy
        if not policy.services and isinstance(policy.min_healthy, HealthyCount):
            return "Every service has at least %s.\n" % _plural(policy.min_healthy.count, "healthy instance")
        if not policy.services:
            return "Every service has at least %s of its instances healthy.\n" % policy.min_healthy
        text = "Every service has its minimum of healthy instances"
        if policy.services:
            count = len(policy.services)
            text += ", and the %d expected %s" % (count, "service is present" if count == 1 else
                                                  "services are all present")
        return text + ".\n"


# ---------------------------------------------------------------------------
# Commands: one small function each
# ---------------------------------------------------------------------------


def say(message: str) -> None:
    """One line on stderr. Nothing when stderr is closed or failing: there is nowhere else
    to say it, and the exit status still tells."""
    stream = sys.stderr
    if stream is None:  # started with 2>&-
        return
    try:
        stream.write(message + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass


def warn(options: Options, message: str) -> None:
    """A warning on stderr, one line, unless --quiet."""
    if not options.quiet:
        say("%s: warning: %s" % (PROG, message))


def _write_all(descriptor: int, data: bytes) -> None:
    """Every byte to the descriptor: partial writes continued, and a non-blocking one that
    is full waited on (Python's own stream drops the rest there when unbuffered)."""
    import select

    view = memoryview(data)
    while view:
        try:
            written = os.write(descriptor, view)
        except BlockingIOError:
            select.select([], [descriptor], [])
            continue
        view = view[written:]


def emit(text: str) -> None:
    """Data to stdout, all of it, now. At the descriptor when there is one, encoded for the
    stream with '?' for what its encoding lacks; BrokenPipeError when the reader has gone,
    OutputFailed when stdout fails otherwise (a full disk, say)."""
    stream = sys.stdout
    if stream is None:
        raise OutputFailed("stdout is closed")
    try:
        descriptor: Optional[int] = stream.fileno()
    except (OSError, ValueError):  # an in-memory stream: a test's, or a program's that embeds this one
        descriptor = None
    try:
        if descriptor is None:
            stream.write(text)
            stream.flush()
        else:
            stream.flush()  # whatever went through the stream before
            _write_all(descriptor, text.encode(getattr(stream, "encoding", None) or "utf-8", "replace"))
    except BrokenPipeError:
        raise
    except OSError as error:
        raise OutputFailed("cannot write to stdout: %s" % (error.strerror or error))


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO or pipe"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


def file_kind(mode: int) -> Optional[str]:
    """What a file of this mode is when it is not a regular file ("a FIFO or pipe"...), else None."""
    return next((kind for is_kind, kind in _FILE_KINDS if is_kind(mode)), None)


def write_target(path: str) -> Tuple[str, Optional[os.stat_result]]:
    """The file that --write PATH replaces, and its current state (None: it does not exist yet).
    A symlink is followed to its target; anything but a regular file or a new name is
    refused (UsageError): a FIFO, a device or a socket would lose what it stands for."""
    if not path:
        raise UsageError("--write needs a file name")
    if path.endswith(os.sep) or os.path.basename(path) in (".", ".."):
        raise UsageError("cannot write %s: it names a directory, not a file" % sanitize(path))
    try:
        status: Optional[os.stat_result] = os.stat(path)  # through any symlink: what PATH stands for
    except FileNotFoundError:  # a new name, or a symlink to one
        status = None
    except OSError as error:  # a symlink loop, a permission denied on the way
        raise UsageError("cannot write %s: %s" % (sanitize(path), error.strerror or error))
    kind = file_kind(status.st_mode) if status is not None else None
    if kind:
        raise UsageError("cannot write %s: it is %s, not a regular file" % (sanitize(path), kind))
    target = os.path.realpath(path)
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise UsageError("cannot write %s: no directory %s" % (sanitize(path), sanitize(directory)))
    return target, status


def _temporary_beside(target: str) -> Tuple[int, str]:
    """A new temporary file in the target's directory (the same file system: the rename is atomic)."""
    import tempfile

    return tempfile.mkstemp(prefix="." + os.path.basename(target) + ".", suffix=".tmp",
                            dir=os.path.dirname(target))


def check_writable(path: str) -> None:
    """Refuse, before any request, a --write FILE that could not be written: by making the
    temporary file for real (os.access says yes to root, even where nothing can be made)."""
    target, _ = write_target(path)
    try:
        handle, temporary = _temporary_beside(target)
    except OSError as error:
        raise UsageError("cannot write %s: %s" % (sanitize(path), error.strerror or error))
    os.close(handle)
    os.unlink(temporary)


def write_atomically(path: str, text: str) -> None:
    """Replace path (or the file its symlink points to) with text in one step: a reader sees
    the old file or the new one, never half. An existing file keeps its mode (and, for root,
    its owner); a new one gets 0666 less the umask. OutputFailed when it cannot be done."""
    target, old = write_target(path)
    try:
        handle, temporary = _temporary_beside(target)
    except OSError as error:
        raise OutputFailed("cannot write %s: %s" % (sanitize(path), error.strerror or error))
    try:
        with os.fdopen(handle, "w", encoding="utf-8", errors="replace") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        if old is not None:
            os.chmod(temporary, stat.S_IMODE(old.st_mode))
            if getattr(os, "geteuid", lambda: None)() == 0:  # POSIX only: Windows has no owners to keep
                os.chown(temporary, old.st_uid, old.st_gid)
        else:
            # mkstemp makes the file 0600; a collector running as another user must be able to read it.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, target)
    except BaseException as error:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        if isinstance(error, OSError):
            raise OutputFailed("cannot write %s: %s" % (sanitize(path), error.strerror or error))
        raise


def deliver(text: str, options: Options) -> None:
    """A command's output: to stdout, or atomically to the --write file."""
    if options.write is not None:
        write_atomically(options.write, text)
    else:
        emit(text)


def _quoted_list(entries: Sequence[Any], limit: int = IPS_LISTED_PER_REASON) -> str:
    shown = ", ".join(sanitize(json.dumps(entry))[:60] for entry in entries[:limit])
    if len(entries) > limit:
        shown += " and %d more" % (len(entries) - limit)
    return shown


def list_fleet(client: CpxClient, options: Options, deadline: float) -> List[str]:
    """The IPs /servers lists; a warning for entries refused, CpxUnavailable when there is none."""
    servers = client.list_servers(deadline)
    if servers.rejected:
        warn(options, "/servers listed %s, not requested: %s" % (
            _plural(len(servers.rejected), "entry that is not an IP address", "entries that are not IP addresses"),
            _quoted_list(servers.rejected)))
    if servers.duplicates:
        warn(options, "/servers listed %s, each address requested once"
             % _plural(servers.duplicates, "duplicate entry", "duplicate entries"))
    if not servers.ips and not servers.other_shards:  # a shard with no instance of its own is no failure
        raise CpxUnavailable("GET %s/servers: no instance listed" % options.url)
    return servers.ips


def utc_now() -> str:
    """This moment in ISO 8601, UTC, to the millisecond: the time of a snapshot's records."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def take_snapshot(client: CpxClient, options: Options) -> Snapshot:
    """Read the whole fleet once; warn about what could not be read, raise if nothing could."""
    started = utc_now()
    scrape_started = time.monotonic()
    deadline = scrape_started + options.deadline
    ips = list_fleet(client, options, deadline)
    reads_started = time.monotonic()
    instances = client.read_instances(ips, deadline)
    if options.verbose:
        say("%s: read %s in %.2f s, peak concurrency %d (ceiling %d), %s"
            % (PROG, _plural(len(instances), "instance"), time.monotonic() - reads_started, client.limiter.peak,
               options.workers, _plural(client.retried, "retry", "retries")))
    failures = summarize_failures(instances)
    if failures and not any(i.readable for i in instances):
        raise CpxUnavailable("%s: %s" % (options.url, failures))
    if failures:
        warn(options, failures)
    return Snapshot(instances, time.monotonic() - scrape_started, started)


def _known_services(instances: Iterable[Instance]) -> List[str]:
    return sorted({i.service for i in instances if i.service is not None})


def _chosen_services(snapshot: Snapshot, patterns: Sequence[str], options: Options) -> Optional[Set[str]]:
    """The services that names or patterns mean, among those seen and those the policy expects;
    None for no choice (every service). Under --shard, a name this slice has no instance of
    may be another slice's: a warning and no row, not a usage error."""
    if not patterns:
        return None
    unreadable = sum(1 for i in snapshot.instances if i.service is None)
    known = _known_services(snapshot.instances) + options.policy.expected
    if options.shard is None:
        return set(resolve_services(patterns, known, unreadable))
    chosen: Set[str] = set()
    for pattern in patterns:
        try:
            chosen.update(resolve_services([pattern], known, unreadable))
        except UsageError:
            warn(options, "--shard %s: no instance of %r in this shard" % (options.shard, sanitize(pattern)))
    return chosen


def _only_services(snapshot: Snapshot, chosen: Optional[Set[str]]) -> Snapshot:
    """The snapshot, or just the instances of the chosen services."""
    if chosen is None:
        return snapshot
    return replace(snapshot, instances=[i for i in snapshot.instances if i.service in chosen])


@dataclass(frozen=True)
class SnapshotSettings:
    """What a snapshot command was asked, beyond the options: which services (names or
    patterns) and statuses, which order, and whether partial data is a failure."""

    services: Tuple[str, ...] = ()
    statuses: Tuple[str, ...] = ()
    sort: str = "service"
    reverse: bool = False
    strict: bool = False


def completable(name: str) -> bool:
    """Whether shell completion may offer a service name: not one read as an option (a leading
    '-'), and nothing a terminal must not be sent (control and format characters)."""
    return bool(name) and not name.startswith("-") and not _UNSAFE_TEXT.search(name)


def remember_services(snapshot: Snapshot, options: Options) -> None:
    """Keep the services seen where shell completion reads them: in a folder of the user's own
    (made 0700), through a temporary file and a rename, at most SERVICE_CACHE_CAP bytes. A
    folder or file that is not the user's own, or not what it should be (a symlink, say), is
    left alone, and so is any failure: completion is a convenience. Limit: the folders above
    the cache's own are trusted (a home, or a sticky /tmp)."""
    if options.service_cache is None:
        return
    folder = os.path.dirname(options.service_cache)
    text, size = [], 0
    for name in _known_services(snapshot.instances):
        line = name + "\n"
        size += len(line.encode("utf-8", "replace"))
        if size > SERVICE_CACHE_CAP:
            break
        if completable(name):
            text.append(line)
    temporary = None
    try:
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
        mine = getattr(os, "geteuid", lambda: None)()
        found = os.lstat(folder)
        if not stat.S_ISDIR(found.st_mode) or found.st_mode & 0o022 or mine not in (None, found.st_uid):
            return
        try:
            if not stat.S_ISREG(os.lstat(options.service_cache).st_mode):
                return
        except FileNotFoundError:
            pass
        handle, temporary = _temporary_beside(options.service_cache)
        with os.fdopen(handle, "w", encoding="utf-8", errors="replace") as stream:
            stream.write("".join(text))
        os.replace(temporary, options.service_cache)
        temporary = None
    except OSError:
        pass
    finally:
        if temporary is not None:
            try:
                os.unlink(temporary)
            except OSError:
                pass


def _ordered(rows: List[Any], settings: SnapshotSettings) -> List[Any]:
    return rows[::-1] if settings.reverse else rows


def _verdict(snapshot: Snapshot, settings: SnapshotSettings, flagged: bool = False) -> int:
    """The exit status once the output is out: flagged, partial (--strict), or success."""
    if flagged:
        return EXIT_FLAGGED
    if settings.strict and not all(i.readable for i in snapshot.instances):
        return EXIT_PARTIAL
    return EXIT_OK


def cmd_services(client: CpxClient, options: Options, settings: SnapshotSettings) -> int:
    """Every instance: IP, service, status, cpu, memory."""
    whole = take_snapshot(client, options)
    chosen = _chosen_services(whole, settings.services, options)
    snapshot = _only_services(whole, chosen)
    shown = filter_statuses(snapshot.instances, settings.statuses, options.thresholds)
    instances = _ordered(sort_instances(shown, settings.sort, options.thresholds), settings)
    deliver(InstancesReport(instances, snapshot, options.policy, options.shard, chosen).render(options), options)
    remember_services(whole, options)
    return _verdict(whole, settings)


def cmd_status(client: CpxClient, options: Options, settings: SnapshotSettings) -> int:
    """Per-service instance counts, healthy counts, averages and maxima."""
    whole = take_snapshot(client, options)
    chosen = _chosen_services(whole, settings.services, options)
    snapshot = _only_services(whole, chosen)
    summaries = _ordered(sort_summaries(fleet_summaries(snapshot.instances, options.policy, chosen), settings.sort),
                         settings)
    deliver(SummariesReport(summaries, snapshot, options.policy, options.shard, chosen).render(options), options)
    remember_services(whole, options)
    return _verdict(whole, settings)


def cmd_unhealthy(client: CpxClient, options: Options, settings: SnapshotSettings) -> int:
    """Services under their minimum of healthy instances, and expected ones that are missing; exit 1 when any."""
    snapshot = take_snapshot(client, options)
    if options.shard is not None:
        warn(options, "--shard %s: this judges only the shard's own instances; judge the whole fleet on the "
                      "shards' sum, in Prometheus (see the README)" % options.shard)
    flagged = _ordered(flag_services(fleet_summaries(snapshot.instances, options.policy), options.policy), settings)
    deliver(FlaggedReport(flagged, snapshot, options.policy, options.shard).render(options), options)
    remember_services(snapshot, options)
    return _verdict(snapshot, settings, flagged=bool(flagged))


# ---------------------------------------------------------------------------
# track: a live view of one service or of the whole fleet (state, polling, views)
# ---------------------------------------------------------------------------
#
# Read from the top: what track was asked (TrackSettings), what it knows of the
# fleet (Membership) and of the session (the row tracks, TrackState), the two
# scopes it can watch, one sample (poll), the schedule, the views, cmd_track().


@dataclass(frozen=True)
class TrackSettings:
    """What track was asked for: one service (None: the whole fleet) and its schedule."""

    service: Optional[str] = None
    interval: float = DEFAULT_INTERVAL
    count: Optional[int] = None
    rediscover: float = DEFAULT_REDISCOVER
    deadline: Optional[float] = None  # --deadline: per sample; None for the default

    @property
    def sample_deadline(self) -> float:
        """Seconds a sample's /servers may take, and then again its reads of instances."""
        # The schedule matters more than one slow instance, which shows as Unknown
        # (deadline) for that sample only. The listing and the reads get this time
        # each, so an API that answers within it is shown with real values even when
        # a sample takes longer than its interval (the header says so).
        return self.deadline if self.deadline is not None else max(self.interval, 1.0)

    @property
    def full_read_deadline(self) -> float:
        """A read of the whole fleet (the first, each rediscovery) gets a whole command's time."""
        return max(DEFAULT_DEADLINE, self.sample_deadline)


class _NotRead:
    """The membership of an instance that never answered: it may belong to any service."""

    def __repr__(self) -> str:
        return "NOT_READ"


NOT_READ = _NotRead()


class Membership:
    """The one owner of which service each listed instance belongs to, as its answers said:
    a service name; None once it answered without a valid one (the "(unknown)" group);
    NOT_READ until it answers at all (a body that is not JSON is no answer)."""

    # An instance that never answered may be the service's: it is read again at the
    # next sample, then after 2, 4, 8... samples, at most RETRY_CAP apart. Read every
    # sample, a few hanging ones would hold every sample to its deadline.
    RETRY_CAP = 32

    def __init__(self) -> None:
        self.services: Dict[str, Any] = OrderedDict()  # ip -> name, None or NOT_READ
        self.samples = 0  # choices made: one per sample
        self.retry: Dict[str, Tuple[int, int]] = {}  # never answered: (failed reads, sample due)

    def forget(self, listed: Sequence[str]) -> List[str]:
        """Follow /servers: instances it no longer lists are forgotten (and returned); new ones are NOT_READ."""
        still = set(listed)
        left = [ip for ip in self.services if ip not in still]
        for ip in left:
            del self.services[ip]
            self.retry.pop(ip, None)
        for ip in listed:
            self.services.setdefault(ip, NOT_READ)
        return left

    def choose(self, service: Optional[str], full: bool, eager: bool = False) -> List[str]:
        """What a sample reads (each call is one sample): every instance when full (or service
        is None), else the service's members and the instances that never answered, when due
        (all of them when eager: while the service is not found, they are all there is to read)."""
        self.samples += 1
        if full or service is None:
            return list(self.services)
        return [ip for ip, known in self.services.items() if known == service or (
            known is NOT_READ and (eager or self.retry.get(ip, (0, 0))[1] <= self.samples))]

    def learn(self, readings: Iterable[Instance]) -> None:
        """Take what readings said: a service named is learnt (a reassignment too); an answer
        without one makes a never-read instance "(unknown)"; a failure changes nothing."""
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

    def service_of(self, ip: str) -> Optional[str]:
        """The service ip is known to belong to, or None."""
        known = self.services.get(ip)
        return known if isinstance(known, str) else None

    def attribute(self, readings: Iterable[Instance]) -> List[Instance]:
        """Readings with their service: one that failed keeps its instance's last known service."""
        return [r if r.service is not None else replace(r, service=self.service_of(r.ip)) for r in readings]

    def members(self, service: str) -> List[str]:
        """The instances known to belong to service, by IP."""
        return sorted((ip for ip, known in self.services.items() if known == service), key=ip_sort_key)

    def known_services(self) -> List[str]:
        """Every service some instance answered with."""
        return sorted({known for known in self.services.values() if isinstance(known, str)})

    def unknown_count(self) -> int:
        """Instances whose service is not known: never answered, or answered without a valid one."""
        return sum(1 for known in self.services.values() if not isinstance(known, str))

    def not_read_count(self) -> int:
        """Instances that never answered (later samples read them again)."""
        return sum(1 for known in self.services.values() if known is NOT_READ)


class RunningStats:
    """Count, min, mean and max in constant memory."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.minimum = float("inf")
        self.maximum = float("-inf")

    def add(self, value: float) -> None:
        """Take one value into account."""
        self.count += 1
        self.total += value
        self.minimum = min(self.minimum, value)
        self.maximum = max(self.maximum, value)

    @property
    def mean(self) -> Optional[float]:
        return self.total / self.count if self.count else None


@dataclass
class TrendBucket:
    """Consecutive samples of a session trend: the sum and count of their values, and how
    many samples (slots) it holds, gaps included."""

    total: float = 0.0
    values: int = 0
    slots: int = 0

    def merged(self, other: "TrendBucket") -> "TrendBucket":
        """This bucket and the next one as one."""
        return TrendBucket(self.total + other.total, self.values + other.values, self.slots + other.slots)

    def mean(self) -> Optional[float]:
        return self.total / self.values if self.values else None


class SessionTrend:
    """A whole session's values in at most `size` buckets: when full, neighbours merge."""

    BUCKETS = 32  # characters of the session summary's sparklines

    def __init__(self, size: int = BUCKETS):
        self.size = size
        self.per_bucket = 1
        self.buckets: List[TrendBucket] = []

    def add(self, value: Optional[float]) -> None:
        """One sample's value, None for a gap (unknown)."""
        if not self.buckets or self.buckets[-1].slots >= self.per_bucket:
            if len(self.buckets) >= self.size:
                pairs = zip(self.buckets[0::2], self.buckets[1::2])
                self.buckets = [first.merged(second) for first, second in pairs]
                self.per_bucket *= 2
            self.buckets.append(TrendBucket())
        bucket = self.buckets[-1]
        bucket.slots += 1
        if value is not None:
            bucket.total += value
            bucket.values += 1

    def values(self) -> List[Optional[float]]:
        """The mean of each bucket, None where it holds no value."""
        return [bucket.mean() for bucket in self.buckets]


class Series:
    """One value across a session: the last WINDOW samples for a live sparkline, running
    min/avg/max and the session trend, all in constant memory. None is a gap."""

    WINDOW = 20  # characters of the live sparklines

    def __init__(self) -> None:
        self.recent: Deque[Optional[float]] = deque(maxlen=self.WINDOW)
        self.stats = RunningStats()
        self.trend = SessionTrend()

    def add(self, value: Optional[float]) -> None:
        """One sample's value."""
        self.recent.append(value)
        self.trend.add(value)
        if value is not None:
            self.stats.add(value)


class InstanceTrack:
    """A row of `track SERVICE`: one instance across the session."""

    def __init__(self, ip: str):
        self.key = ip
        self.order = ip_sort_key(ip)  # parsed once: rows are sorted several times a sample
        self.last: Optional[Instance] = None
        self.cpu = Series()
        self.memory = Series()
        self.samples = 0
        self.unhealthy = 0
        self.gone = False

    def add(self, reading: Optional[Instance], thresholds: Thresholds) -> None:
        """One sample: a reading, or None when CPX could not be reached (a gap)."""
        usage = reading.usage() if reading is not None else None
        self.cpu.add(usage[0] if usage is not None else None)
        self.memory.add(usage[1] if usage is not None else None)
        if reading is not None:
            self.last = reading
            self.samples += 1
            self.unhealthy += instance_status(reading, thresholds) == UNHEALTHY

    def status(self, thresholds: Thresholds) -> str:
        """Its status now: Gone, Unknown, or that of its last reading."""
        if self.gone:
            return GONE
        return UNKNOWN if self.last is None else instance_status(self.last, thresholds)

    def healthy_count(self, thresholds: Thresholds) -> int:
        return int(self.status(thresholds) == HEALTHY)

    def instance_count(self) -> int:
        return 0 if self.gone else 1


class ServiceTrack:
    """A row of the whole-fleet view: one service (None: the "(unknown)" group) across the session."""

    def __init__(self, service: Optional[str], policy: Policy = Policy()):
        self.key = service
        self.policy = policy  # the minimum of healthy instances
        self.last: Optional[ServiceSummary] = None
        self.healthy_share = Series()  # percent of its instances healthy: the sparkline
        self.healthy = RunningStats()  # healthy instances: the summary's min/avg/max
        self.cpu = Series()  # average cpu
        self.memory = Series()  # average memory
        self.samples = 0
        self.flagged = 0  # samples under the policy's minimum of healthy instances
        self.gone = False

    def add(self, summary: Optional[ServiceSummary], thresholds: Thresholds) -> None:
        """One sample: the service's summary, or None when CPX could not be reached (a gap)."""
        if summary is None:
            for series in (self.healthy_share, self.cpu, self.memory):
                series.add(None)
            return
        self.healthy_share.add(100.0 * summary.healthy / summary.instances)
        self.cpu.add(summary.avg_cpu)
        self.memory.add(summary.avg_memory)
        self.healthy.add(summary.healthy)
        self.last = summary
        self.samples += 1
        self.flagged += self.under_minimum(summary)

    def under_minimum(self, summary: ServiceSummary) -> bool:
        """Whether a sample has fewer healthy instances than the policy's minimum for the service."""
        return summary.healthy < self.policy.min_healthy_for(self.key, summary.instances)

    def rank(self) -> Tuple:
        """Worst first: services under the minimum of healthy instances, then by share healthy."""
        if self.gone or self.last is None:
            return (2, 0.0, service_sort_key(self.key))
        last = self.last
        return (int(not self.under_minimum(last)), last.healthy / last.instances, service_sort_key(self.key))

    def healthy_count(self, thresholds: Thresholds) -> int:
        return 0 if self.gone or self.last is None else self.last.healthy

    def instance_count(self) -> int:
        return 0 if self.gone or self.last is None else self.last.instances


@dataclass
class Sample:
    """One sample as read: its rows by key, in display order, or why CPX was unreachable."""

    moment: str
    values: Dict[Any, Any]
    outage: Optional[str] = None
    seconds: float = 0.0  # how long it took
    note: Optional[str] = None  # what the view says above the table (a service not found yet)


@dataclass
class WorstMoment:
    """The sample with the fewest healthy instances."""

    healthy: int
    instances: int
    moment: str
    sample: int


class TrackState:
    """Everything track knows of a session, in bounded memory: a row track per key (an
    instance, or a service), counters, and the worst moment."""

    def __init__(self, scope: Any, thresholds: Thresholds, interval: float):
        self.scope = scope
        self.thresholds = thresholds
        self.interval = interval
        self.rows: Dict[Any, Any] = {}
        self.samples = 0
        self.skipped = 0  # slots that began while a sample was still running
        self.late = 0  # samples that took longer than the interval
        self.unreachable = 0
        self.first_time: Optional[str] = None
        self.last_good_time: Optional[str] = None
        self.last = Sample("", {})  # the last sample taken
        self.gone: List[Any] = []  # keys that left in the last sample
        self.worst: Optional[WorstMoment] = None

    @property
    def last_time(self) -> str:
        """When the last sample was taken."""
        return self.last.moment

    @property
    def outage(self) -> Optional[str]:
        """Why the last sample could not reach CPX; None when it could."""
        return self.last.outage

    @property
    def last_was_late(self) -> bool:
        """The last sample took longer than the interval (the first, a read of the whole fleet, never counts)."""
        return self.samples > 1 and self.last.seconds > self.interval

    def tracks(self) -> List[Any]:
        """Every row seen this session, in the scope's order."""
        return self.scope.order(list(self.rows.values()))

    def present(self) -> List[Any]:
        """The rows still there."""
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
                track.add(None, self.thresholds)
            return
        self.last_good_time = sample.moment
        self.gone = [key for key, track in self.rows.items() if not track.gone and key not in sample.values]
        for key in self.gone:
            self.rows[key].gone = True
        for key, value in sample.values.items():
            track = self.rows.get(key)
            if track is None:
                track = self.rows[key] = self.scope.new_track(key)
            track.gone = False
            track.add(value, self.thresholds)
        self._note_worst()

    def _note_worst(self) -> None:
        present = self.present()
        if not present:
            return
        healthy = sum(t.healthy_count(self.thresholds) for t in present)
        if self.worst is None or healthy < self.worst.healthy:
            self.worst = WorstMoment(healthy, sum(t.instance_count() for t in present), self.last_time,
                                     self.samples)


SPARK_BLOCKS = "\u2581\u2582\u2583\u2584\u2585\u2586\u2587\u2588"
SPARK_ASCII = "_.,-~=*#"


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


def _min_avg_max(stats: RunningStats, unit: str = "%", threshold: Optional[float] = None) -> str:
    if not stats.count:
        return "-"

    def short(value: float) -> str:
        text = shown_percent(value, 1, threshold) if unit == "%" else "%.1f" % value
        return text[:-2] if text.endswith(".0") else text
    return "%s/%s/%s%s" % (short(stats.minimum), short(stats.mean or 0.0), short(stats.maximum), unit)


def _fit(tracks: List[Any], max_rows: Optional[int], worst_first: Any) -> Tuple[List[Any], int]:
    """The rows that fit max_rows (one line kept to count the others): the worst first,
    shown in their own order; and how many were left out."""
    if max_rows is None or len(tracks) <= max_rows:
        return tracks, 0
    kept = {id(t) for t in sorted(tracks, key=worst_first)[:max(1, max_rows - 1)]}
    shown = [t for t in tracks if id(t) in kept]
    return shown, len(tracks) - len(shown)


def _left_out(hidden: int, noun: str) -> str:
    """The line under a table cut to fit the terminal, or nothing."""
    if not hidden:
        return ""
    return "%s not shown (the worst are shown first; a taller terminal shows all)\n" % _plural(hidden, noun)


def _values(records: Sequence[Any], name: str) -> List[Optional[float]]:
    """One field of each record, None where there is no record."""
    return [None if record is None else getattr(record, name) for record in records]


class ServiceScope:
    """`track SERVICE`: a row per instance of one service, found by name (exact, then any case)."""

    FIELDS = ("time", "ip", "service", "status", "cpu", "memory")
    COLUMNS = ("IP", "Status", "CPU", "CPU trend", "Memory", "Memory trend")
    SUMMARY_COLUMNS = ("IP", "Samples", "CPU min/avg/max", "Memory min/avg/max", "Unhealthy", "CPU trend",
                       "Memory trend")
    new_track = InstanceTrack

    def __init__(self, name: str, thresholds: Thresholds):
        self.name = name
        self.thresholds = thresholds
        self.service: Optional[str] = None  # the name as CPX spells it, once an instance said it

    @property
    def title(self) -> str:
        return sanitize(self.service or self.name)

    def to_read(self, membership: Membership, full: bool) -> List[str]:
        """Its members, and the instances that never answered; the whole fleet when full."""
        return membership.choose(self.service or self.name, full, eager=self.service is None)

    def resolve(self, membership: Membership, first: bool) -> None:
        """Learn which service the name means. Until an instance of it answers, the instances not
        read are read again each sample; at the first sample, a name that matches nothing while
        every instance was read is a usage error (a typo)."""
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
        """The sample's rows: each member's reading, by IP."""
        ours = [r for r in membership.attribute(readings) if self.service is not None and r.service == self.service]
        return OrderedDict((r.ip, r) for r in sorted(ours, key=lambda r: ip_sort_key(r.ip)))

    def note(self, membership: Membership) -> Optional[str]:
        """A line above the table: the service not found yet, or instances not read yet."""
        missing = self.not_found(membership)
        if missing is not None:
            return missing
        waiting = membership.not_read_count()
        return "%s not read yet: read again in later samples" % _plural(waiting, "instance") if waiting else None

    def order(self, tracks: List[InstanceTrack]) -> List[InstanceTrack]:
        return sorted(tracks, key=lambda t: t.order)

    def subject(self, state: TrackState) -> str:
        return "%s  %s" % (self.title, _plural(len(state.present()), "instance"))

    def table(self, state: TrackState, blocks: str, color: bool, max_rows: Optional[int] = None) -> str:
        """Every instance with its status, values and recent trend; when only max_rows fit,
        the worst instances (then the lowest IPs) and a line counting the others."""
        thresholds = state.thresholds
        tracks, hidden = _fit(state.tracks(), max_rows,
                              lambda t: _STATUS_RANK.get(t.status(thresholds), len(_STATUS_RANK)))  # Gone last
        readable = [t.last if t.status(thresholds) in (HEALTHY, UNHEALTHY) else None for t in tracks]
        cpu_values, memory_values = _values(readable, "cpu"), _values(readable, "memory")
        limits = thresholds.for_service(self.service)
        cpus = format_percents(cpu_values, limits.cpu)
        memories = format_percents(memory_values, limits.memory)
        rows, styles = [], []
        for index, track in enumerate(tracks):
            status, style = self._status_cell(track, state)
            rows.append([sanitize(track.key), status, _marked(cpus[index], cpu_values[index], limits.cpu),
                         sparkline(track.cpu.recent, blocks),
                         _marked(memories[index], memory_values[index], limits.memory),
                         sparkline(track.memory.recent, blocks)])
            styles.append(style)
        table = render_table(self.COLUMNS, rows, (False, False, True, False, True, False), styles, color)
        return table + _left_out(hidden, "more instance")

    def _status_cell(self, track: InstanceTrack, state: TrackState) -> Tuple[str, str]:
        if track.gone or track.last is None:
            return (GONE if track.gone else UNKNOWN), "stale"
        if state.outage is not None:
            return status_label(track.last, state.thresholds) + " (stale)", "stale"
        return status_label(track.last, state.thresholds), instance_status(track.last, state.thresholds)

    def summary_table(self, state: TrackState, blocks: str) -> str:
        """Per instance: samples, min/avg/max, samples unhealthy, the session's trend."""
        limits = state.thresholds.for_service(self.service)
        rows = [[sanitize(t.key) + (" (gone)" if t.gone else ""), str(t.samples),
                 _min_avg_max(t.cpu.stats, "%", limits.cpu), _min_avg_max(t.memory.stats, "%", limits.memory),
                 str(t.unhealthy), sparkline(t.cpu.trend.values(), blocks),
                 sparkline(t.memory.trend.values(), blocks)] for t in state.tracks()]
        return render_table(self.SUMMARY_COLUMNS, rows, (False, True, True, True, True, False, False))

    def records(self, state: TrackState) -> List[Dict[str, Any]]:
        """The last sample as json/csv records: its instances, then those gone."""
        records = []
        for reading in state.last.values.values():
            record = instance_record(reading, state.thresholds)
            del record["error"]
            records.append(dict(time=state.last_time, **record))
        for ip in state.gone:
            records.append({"time": state.last_time, "ip": ip, "service": self.service, "status": GONE,
                            "cpu": None, "memory": None})
        return records


class FleetScope:
    """`track` with no SERVICE (or --all): the whole fleet, a row per service, worst first."""

    FIELDS = ("time", "service", "instances", "healthy", "avg_cpu", "max_cpu", "avg_memory", "max_memory")
    COLUMNS = ("Service", "Instances", "Healthy", "Healthy trend", "Avg CPU", "Max CPU", "CPU trend",
               "Avg Memory", "Max Memory")
    SUMMARY_COLUMNS = ("Service", "Samples", "Healthy min/avg/max", "Avg CPU min/avg/max",
                       "Avg Memory min/avg/max", "Under minimum", "Healthy trend", "CPU trend")
    title = "fleet"

    def __init__(self, policy: Policy):
        self.policy = policy
        self.thresholds = policy.thresholds()

    def new_track(self, service: Optional[str]) -> ServiceTrack:
        return ServiceTrack(service, self.policy)

    def to_read(self, membership: Membership, full: bool) -> List[str]:
        """The whole fleet, every sample."""
        return membership.choose(None, True)

    def resolve(self, membership: Membership, first: bool) -> None:
        """Nothing to find: every service is shown."""

    def not_found(self, membership: Membership) -> Optional[str]:
        return None

    def finish(self, membership: Membership) -> None:
        """Nothing to check."""

    def values(self, membership: Membership, readings: Sequence[Instance]) -> Dict[Any, Any]:
        """The sample's rows: a summary per service, the "(unknown)" group included."""
        summaries = summarize_services(membership.attribute(readings), self.thresholds)
        return OrderedDict((s.service, s) for s in summaries)

    def note(self, membership: Membership) -> Optional[str]:
        return None

    def order(self, tracks: List[ServiceTrack]) -> List[ServiceTrack]:
        return sorted(tracks, key=ServiceTrack.rank)

    def subject(self, state: TrackState) -> str:
        present = state.present()
        return "fleet  %s in %s" % (_plural(sum(t.instance_count() for t in present), "instance"),
                                    _plural(sum(1 for t in present if t.key is not None), "service"))

    def table(self, state: TrackState, blocks: str, color: bool, max_rows: Optional[int] = None) -> str:
        """Every service: instances, healthy, average and highest cpu and memory, and trends,
        worst first; when only max_rows fit, the worst and a line counting the others."""
        tracks, hidden = _fit(state.tracks(), max_rows, ServiceTrack.rank)
        lasts = [None if t.gone else t.last for t in tracks]
        max_cpu, max_memory = _values(lasts, "max_cpu"), _values(lasts, "max_memory")
        limits = [state.thresholds.for_service(t.key) for t in tracks]
        cpu, memory = [t.cpu for t in limits], [t.memory for t in limits]
        columns = [format_percents(_values(lasts, "avg_cpu"), cpu),
                   format_percents(_values(lasts, "avg_memory"), memory),
                   format_percents(max_cpu, cpu), format_percents(max_memory, memory)]
        rows, styles = [], []
        for index, track in enumerate(tracks):
            avg_cpu, avg_memory, top_cpu, top_memory = (column[index] for column in columns)
            rows.append([service_label(track.key) + (" (gone)" if track.gone else ""),
                         *self._count_cells(track, lasts[index]), sparkline(track.healthy_share.recent, blocks),
                         avg_cpu,
                         _marked(top_cpu, max_cpu[index], cpu[index]), sparkline(track.cpu.recent, blocks),
                         avg_memory, _marked(top_memory, max_memory[index], memory[index])])
            styles.append(self._style(track, lasts[index], state))
        table = render_table(self.COLUMNS, rows, (False, True, True, False, True, True, False, True, True),
                             styles, color)
        return table + _left_out(hidden, "more service")

    @staticmethod
    def _count_cells(track: ServiceTrack, last: Optional[ServiceSummary]) -> List[str]:
        """Instances and healthy ones; a '!' under the minimum of healthy instances."""
        if last is None:
            return ["-", "-"]
        return [str(last.instances), "%d%s" % (last.healthy, "!" if track.under_minimum(last) else "")]

    @staticmethod
    def _style(track: ServiceTrack, last: Optional[ServiceSummary], state: TrackState) -> Optional[str]:
        if last is None or state.outage is not None:
            return "stale"
        if track.under_minimum(last):
            return UNHEALTHY
        return UNKNOWN if track.key is None else None

    def summary_table(self, state: TrackState, blocks: str) -> str:
        """Per service: samples, healthy and average min/avg/max, samples flagged, the session's trend."""
        rows = [[service_label(t.key) + (" (gone)" if t.gone else ""), str(t.samples),
                 _min_avg_max(t.healthy, ""), _min_avg_max(t.cpu.stats, "%", state.thresholds.for_service(t.key).cpu),
                 _min_avg_max(t.memory.stats, "%", state.thresholds.for_service(t.key).memory),
                 str(t.flagged), sparkline(t.healthy_share.trend.values(), blocks),
                 sparkline(t.cpu.trend.values(), blocks)] for t in state.tracks()]
        return render_table(self.SUMMARY_COLUMNS, rows, (False, True, True, True, True, True, False, False))

    def records(self, state: TrackState) -> List[Dict[str, Any]]:
        """The last sample as json/csv records: a service each, then those gone (0 instances)."""
        records = []
        for summary in state.last.values.values():
            record = dict(summary_record(summary, state.thresholds), time=state.last_time)
            records.append({name: record[name] for name in self.FIELDS})
        for service in state.gone:
            records.append(dict({name: None for name in self.FIELDS}, time=state.last_time, service=service,
                                instances=0, healthy=0))
        return records


def _wall_clock() -> str:
    from datetime import datetime

    return datetime.now().astimezone().isoformat(timespec="milliseconds")


def poll(client: CpxClient, membership: Membership, scope: Any, full: bool, seconds: float,
         first: bool = False) -> Sample:
    """One sample: /servers, then what the scope reads (the whole fleet when full), each within
    `seconds`. CPX is unreachable when /servers failed and no instance answered; on the first
    sample, an unreadable /servers is CpxUnavailable instead."""
    moment, started = _wall_clock(), time.monotonic()
    listing_error = None
    try:
        if first:
            membership.forget(list_fleet(client, client.options, started + seconds))
        else:
            membership.forget(client.list_servers(started + seconds).ips)
    except CpxUnavailable as error:
        if first:
            raise
        listing_error = str(error)
    readings = client.read_instances(scope.to_read(membership, full), time.monotonic() + seconds)
    membership.learn(readings)
    if listing_error is not None and not any(r.readable for r in readings):
        return Sample(moment, {}, listing_error, time.monotonic() - started)
    scope.resolve(membership, first)
    return Sample(moment, scope.values(membership, readings), None, time.monotonic() - started,
                  scope.note(membership))


def first_sample(client: CpxClient, membership: Membership, scope: Any, settings: TrackSettings) -> Sample:
    """The first sample, a read of the whole fleet, as of its end: the schedule starts there,
    so that a long first read costs no skipped slot."""
    sample = poll(client, membership, scope, True, settings.full_read_deadline, first=True)
    missing = scope.not_found(membership)
    if missing:
        warn(client.options, "%s; reading them again every sample" % missing)
    sample.moment = _wall_clock()
    return sample


class Schedule:
    """Sample k starts at start + k x interval; a slot that began while the previous
    sample was still running is skipped and counted, never made up in a burst."""

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
    """One line: what is watched, the time, the sample number, the interval (and how long the
    sample took when that was longer), skipped slots."""
    line = "%s  %s  sample %d  " % (state.scope.subject(state), state.last_time, state.samples)
    if state.last_was_late:
        line += "interval %gs, sample took %.1fs" % (state.interval, state.last.seconds)
    else:
        line += "every %gs" % state.interval
    if state.skipped:
        line += "  %s skipped" % _plural(state.skipped, "slot")
    return line


def render_outage(state: TrackState) -> str:
    """Why the last sample could not reach CPX, and how old the values shown are."""
    since = " (values from %s)" % state.last_good_time if state.last_good_time else ""
    return "CPX unreachable at %s: %s; keeping the last known values%s" % (state.last_time, state.outage, since)


def render_track_summary(state: TrackState, blocks: str) -> str:
    """The end-of-session summary, like ping's: per row, then the worst moment."""
    lines = ["--- %s: %s from %s to %s, %d over the interval, %s skipped, %d unreachable ---" % (
        state.scope.title, _plural(state.samples, "sample"), state.first_time, state.last_time, state.late,
        _plural(state.skipped, "slot"), state.unreachable)]
    lines.append(state.scope.summary_table(state, blocks).rstrip("\n"))
    if state.worst is not None:
        worst = state.worst
        if worst.instances:
            lines.append("worst moment: %d of %s healthy at %s (sample %d)" % (
                worst.healthy, _plural(worst.instances, "instance"), worst.moment, worst.sample))
        else:
            lines.append("worst moment: no instance present at %s (sample %d)" % (worst.moment, worst.sample))
    return "\n".join(lines) + "\n"


class Keyboard:
    """`q` stops the live view, as in top: stdin without line buffering or echo while the view
    owns the screen. Only when stdin is a terminal and this process is in its foreground:
    a background job changing the terminal's modes would be stopped by SIGTTOU."""

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
            if not os.isatty(descriptor) or os.tcgetpgrp(descriptor) != os.getpgrp():
                return
            saved = termios.tcgetattr(descriptor)
            tty.setcbreak(descriptor, termios.TCSANOW)
            self.saved = saved
        except (OSError, ValueError, AttributeError, termios.error):
            self.saved = None

    @property
    def active(self) -> bool:
        return self.saved is not None

    def wait(self, seconds: float) -> bool:
        """Sleep for seconds; True as soon as q is pressed."""
        import select

        end = time.monotonic() + seconds
        descriptor = self.stream.fileno()
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return False
            if not select.select([descriptor], [], [], left)[0]:
                continue
            keys = os.read(descriptor, 64)
            if not keys:  # end of input: nothing more to read, sleep the rest
                time.sleep(max(0.0, end - time.monotonic()))
                return False
            if b"q" in keys.lower():
                return True

    def close(self) -> None:
        """Give the terminal its modes back."""
        if self.saved is None:
            return
        import termios

        try:
            termios.tcsetattr(self.stream.fileno(), termios.TCSADRAIN, self.saved)
        except (OSError, ValueError, termios.error):
            pass
        self.saved = None


class TrackView:
    """Where track's samples go; one small class per kind: LogView (an appended log),
    ScreenView (a screen redrawn in place) and RecordsView (JSON Lines or csv)."""

    def __init__(self, options: Options, settings: TrackSettings):
        self.options = options
        self.settings = settings
        self.keyboard = Keyboard(sys.stdin)

    def open(self) -> None:
        """Get ready for the first sample."""

    def wait(self, seconds: float) -> bool:
        """Wait for the next sample; True when the user pressed q."""
        if self.keyboard.active:
            return self.keyboard.wait(seconds)
        time.sleep(seconds)
        return False

    def show(self, state: TrackState) -> None:
        """Show one sample."""
        raise NotImplementedError

    def note(self, state: TrackState) -> List[str]:
        """The sample's note (instances not read yet, say), painted, as 0 or 1 line."""
        return [paint(state.last.note, UNKNOWN, self.options.color)] if state.last.note else []

    def close(self, state: TrackState) -> None:
        """Print the session summary."""
        emit(render_track_summary(state, spark_blocks(sys.stdout)))


class LogView(TrackView):
    """Each sample appended as a block: the header, the table, an outage line."""

    def __init__(self, options: Options, settings: TrackSettings):
        super().__init__(options, settings)
        self.blocks = spark_blocks(sys.stdout)

    def show(self, state: TrackState) -> None:
        table = state.scope.table(state, self.blocks, self.options.color)
        outage = [render_outage(state)] if state.outage is not None else []
        emit("\n".join([render_track_header(state)] + self.note(state) + [table.rstrip("\n")] + outage) + "\n\n")


class ScreenView(LogView):
    """The terminal's alternate screen, redrawn in place; q quits."""

    # Alternate screen, cursor hidden, and no auto-wrap, so that a line wider than
    # the terminal is clipped rather than wrapped: the frame never scrolls.
    ENTER = "\x1b[?1049h\x1b[?25l\x1b[?7l"
    LEAVE = "\x1b[?7h\x1b[?25h\x1b[?1049l"  # all that back: the screen the user had

    def __init__(self, options: Options, settings: TrackSettings):
        super().__init__(options, settings)
        self.entered = False

    def open(self) -> None:
        """Take over the screen and the keyboard."""
        emit(self.ENTER)
        self.entered = True
        self.keyboard.open()

    def footer(self, state: TrackState) -> str:
        """The screen's last line: an outage, else how the view ends."""
        if state.outage is not None:
            return paint(render_outage(state), UNHEALTHY, self.options.color)
        if self.settings.count is not None:
            return "stops after %s" % _plural(self.settings.count, "sample")
        return "%s to stop" % ("q or Ctrl+C" if self.keyboard.active else "Ctrl+C")

    def show(self, state: TrackState) -> None:
        note = self.note(state)
        # Header, (note,) blank, two table heading lines, blank, footer: 6 or 7 lines around the rows.
        rows_that_fit = max(1, shutil.get_terminal_size((80, 24)).lines - 6 - len(note))
        table = state.scope.table(state, self.blocks, self.options.color, rows_that_fit)
        lines = [render_track_header(state)] + note + [""] + table.splitlines() + ["", self.footer(state)]
        # No newline after the last line: on the bottom row it would scroll the screen.
        emit("\x1b[H" + "\x1b[K\n".join(lines) + "\x1b[K\x1b[J")

    def close(self, state: TrackState) -> None:
        """Give the screen and keyboard back (whatever ended the view), then the summary."""
        self.keyboard.close()
        if self.entered:
            emit(self.LEAVE)
            self.entered = False
        super().close(state)


class RecordsView(TrackView):
    """Records on stdout, one per instance (or service) and sample; outages and the summary
    on stderr, so that stdout stays machine-readable."""

    def show(self, state: TrackState) -> None:
        if state.outage is not None:
            warn(self.options, render_outage(state))
        else:
            emit(self.render(state, state.scope.records(state)))

    def render(self, state: TrackState, records: List[Dict[str, Any]]) -> str:
        """The last sample's records as text."""
        raise NotImplementedError

    def close(self, state: TrackState) -> None:
        say(render_track_summary(state, spark_blocks(sys.stderr)).rstrip("\n"))


class JsonLinesView(RecordsView):
    """-o json: JSON Lines, one object per line."""

    def render(self, state: TrackState, records: List[Dict[str, Any]]) -> str:
        return "".join(json.dumps(record) + "\n" for record in records)


class CsvView(RecordsView):
    """-o csv: rows, the header once, with the first sample."""

    def render(self, state: TrackState, records: List[Dict[str, Any]]) -> str:
        return render_csv(state.scope.FIELDS, records, state.samples == 1 and self.options.headers)


def track_view(options: Options, settings: TrackSettings) -> TrackView:
    """The view for the output asked for: records for json and csv; for a table, the screen
    on an interactive terminal, else a log."""
    records = {"json": JsonLinesView, "csv": CsvView}.get(options.output)
    if records is not None:
        return records(options, settings)
    return ScreenView(options, settings) if options.interactive else LogView(options, settings)


def cmd_track(client: CpxClient, options: Options, settings: TrackSettings) -> int:
    """Sample one service, or the whole fleet, on a fixed schedule until q, Ctrl+C or
    --count samples, then summarize."""
    if options.output == "prometheus" or options.write is not None:
        raise UsageError("track streams: -o prometheus and --write are for services, status and unhealthy")
    scope = FleetScope(options.policy) if settings.service is None else ServiceScope(
        settings.service, options.thresholds)
    membership = Membership()
    sample = first_sample(client, membership, scope, settings)
    state = TrackState(scope, options.thresholds, settings.interval)
    view = track_view(options, settings)
    schedule = Schedule(settings.interval, time.monotonic(), settings.rediscover)
    code = EXIT_OK
    try:
        view.open()
        while True:
            state.record(sample)
            view.show(state)
            if settings.count is not None and state.samples >= settings.count:
                break
            wait, missed = schedule.next_wait(time.monotonic())
            state.skipped += missed
            if view.wait(wait):
                break  # q
            full = schedule.full_read_due(time.monotonic())
            sample = poll(client, membership, scope, full,
                          settings.full_read_deadline if full else settings.sample_deadline)
    except KeyboardInterrupt:
        pass  # Ctrl+C is how a live view is stopped: a normal end
    except Terminated:
        code = EXIT_TERMINATED
    finally:
        view.close(state)
    if code == EXIT_OK:
        scope.finish(membership)
    return code


# ---------------------------------------------------------------------------
# The simulator: a CPX-compatible server on loopback
# ---------------------------------------------------------------------------

SIMULATED_SERVICES = ("UserService", "TicketService", "PaymentService", "AuthService",
                      "SearchService", "InventoryService", "NotificationService",
                      "ReportService", "GeoService", "MailService")


def _splitmix64(state: int) -> Tuple[int, float]:
    """The next state and a uniform number in [0, 1): a tiny, seedable generator per instance."""
    state = (state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    mixed = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    mixed = ((mixed ^ (mixed >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return state, ((mixed ^ (mixed >> 31)) >> 11) / float(1 << 53)


@dataclass(frozen=True)
class Sickness:
    """What part of a simulated fleet is sick, as fractions of its instances (each at least one
    instance when above 0; which ones, the seed decides): instances that answer HTTP 500 at
    once, that never answer, and that answer slow_ms late."""

    fail_fraction: float = 0.0
    hang_fraction: float = 0.0
    slow_fraction: float = 0.0
    slow_ms: float = 0.0

    def counts(self, servers: int) -> Tuple[int, int, int]:
        """How many instances fail, hang and are slow in a fleet of this size."""
        def count(fraction: float) -> int:
            return max(1, int(fraction * servers + 0.5)) if fraction > 0 else 0
        return count(self.fail_fraction), count(self.hang_fraction), count(self.slow_fraction)


FAIL, HANG, SLOW = "fail", "hang", "slow"


@dataclass
class SimulatedInstance:
    """One simulated instance: its service, where its random walk is, where it is pulled back
    to, and its own generator's state."""

    service: str
    cpu: float
    memory: float
    base_cpu: float
    base_memory: float
    seed: int


class SimulatedFleet:
    """Instances with a service each and a cpu/memory random walk, some of them sick; thread-safe.

    Each instance walks on its own generator, so with a seed the values an
    instance shows depend only on how often it was read, not on the order in
    which concurrent requests arrive: seeded runs are reproducible."""

    def __init__(self, count: int, seed: Optional[int] = None, sickness: Sickness = Sickness()):
        rng = random.Random(seed)
        self.lock = threading.Lock()
        self.state: Dict[str, SimulatedInstance] = {}
        self.ips = ["10.58.%d.%d" % (1 + k // 254, 1 + k % 254) for k in range(count)]
        small = SIMULATED_SERVICES[-1]
        for index, ip in enumerate(self.ips):
            if count >= 20 and index in (0, 1):
                service = small  # a two-instance service, one of them hot: something to flag
            elif count >= 20:
                service = rng.choice(SIMULATED_SERVICES[:-1])
            else:
                service = SIMULATED_SERVICES[index % len(SIMULATED_SERVICES)]
            hot = index == 0 or rng.random() < 0.04
            base_cpu = rng.uniform(93, 99) if hot else rng.uniform(5, 70)
            base_memory = rng.uniform(10, 80)
            self.state[ip] = SimulatedInstance(service, base_cpu, base_memory, base_cpu, base_memory,
                                               rng.getrandbits(64))
        # A generator of its own, so that a sick fleet shows the same values as a healthy one.
        order = list(self.ips)
        random.Random(None if seed is None else "sick-%d" % seed).shuffle(order)
        fail, hang, slow = sickness.counts(count)
        self.sick: Dict[str, str] = {}  # ip -> FAIL, HANG or SLOW
        for kind, how_many in ((FAIL, fail), (HANG, hang), (SLOW, slow)):
            for ip in order[:how_many]:
                self.sick[ip] = kind
            order = order[how_many:]

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


@dataclass(frozen=True)
class SimulatorSettings:
    """What `simulate` serves, and where."""

    host: str = "127.0.0.1"
    port: int = 0
    servers: int = 150
    latency_ms: float = 0.0
    seed: Optional[int] = None
    single_threaded: bool = False
    sickness: Sickness = Sickness()


@functools.lru_cache(maxsize=None)
def _simulator_classes() -> Tuple[Any, Any]:
    """The simulator's server classes (threaded, single-threaded), made once on first use:
    http.server costs about 24 ms to import, which --help, usage errors and every
    command but `simulate` need not pay."""
    from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer

    class SimulatorHandler(BaseHTTPRequestHandler):
        """The CPX API, answered from the server's simulated fleet."""

        server_version = "cpx-simulator/" + __version__
        server: "SimulatorServer"

        def do_GET(self) -> None:
            settings = self.server.settings
            sick = self.server.fleet.sick.get(self.path[1:])
            if sick == FAIL:
                self._answer(500, b'{"error": "Internal Server Error"}')
                return
            if settings.latency_ms:
                time.sleep(settings.latency_ms / 1000.0)
            if sick == HANG:
                self._hang()
                return
            if sick == SLOW:
                time.sleep(settings.sickness.slow_ms / 1000.0)
            if self.path == "/servers":
                self._answer(200, self.server.server_list)
                return
            reading = self.server.fleet.read(self.path[1:])
            if reading is None:
                self._answer(400, b'{"error": "Invalid IP"}')
            else:
                self._answer(200, json.dumps(reading).encode())

        def _hang(self) -> None:
            """Answer nothing until the client gives up (or the simulator stops)."""
            import select

            self.close_connection = True
            stopping = self.server.stopping
            while not stopping.is_set():
                if select.select([self.connection], [], [], 0.2)[0]:
                    try:
                        if not self.connection.recv(1, socket.MSG_PEEK):
                            return  # the client closed the connection
                    except OSError:
                        return
                    stopping.wait(0.2)  # it sent more than its request: keep hanging

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a request log would drown the demo


    class SimulatorServer(ThreadingHTTPServer):
        """A CPX-compatible server: a thread per request, a deep listen queue."""

        request_queue_size = 1024
        daemon_threads = True

        def __init__(self, settings: SimulatorSettings):
            self.settings = settings
            if ":" in settings.host:
                self.address_family = socket.AF_INET6
            self.fleet = SimulatedFleet(settings.servers, settings.seed, settings.sickness)
            self.server_list = json.dumps(self.fleet.ips).encode()
            self.stopping = threading.Event()  # set on close: hanging answers end
            super().__init__((settings.host, settings.port), SimulatorHandler)

        @property
        def url(self) -> str:
            host = self.settings.host
            return "http://%s:%d" % (host if ":" not in host else "[%s]" % host, self.server_address[1])

        def server_close(self) -> None:
            self.stopping.set()
            super().server_close()

        def handle_error(self, request: Any, client_address: Any) -> None:
            # A client that hangs up mid-answer (or sends rubbish) is the client's business:
            # no traceback. Anything else is the simulator's bug, and is shown.
            if not isinstance(sys.exc_info()[1], OSError):
                super().handle_error(request, client_address)


    class SingleThreadedSimulatorServer(SimulatorServer):
        """The reference server: one request at a time, a listen backlog of 5."""

        request_queue_size = 5

        def process_request(self, request: Any, client_address: Any) -> None:
            # socketserver's own, without the thread ThreadingMixIn would start.
            HTTPServer.process_request(self, request, client_address)

    return SimulatorServer, SingleThreadedSimulatorServer


def serve_simulator(settings: SimulatorSettings) -> Any:
    """Start a CPX-compatible server in a background thread; returns the server (see .url)."""
    threaded, single_threaded = _simulator_classes()
    server = (single_threaded if settings.single_threaded else threaded)(settings)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="simulator", daemon=True)
    thread.start()
    return server


def start_simulator(host: str = "127.0.0.1", port: int = 0, servers: int = 150, latency_ms: float = 0.0,
                    seed: Optional[int] = None, single_threaded: bool = False,
                    sickness: Sickness = Sickness()) -> Any:
    """serve_simulator() with the settings as keywords (tests, the benchmark)."""
    return serve_simulator(SimulatorSettings(host, port, servers, latency_ms, seed, single_threaded, sickness))


def cmd_simulate(settings: SimulatorSettings) -> int:
    """Serve a simulated fleet until Ctrl+C."""
    sickness = settings.sickness
    if sum(sickness.counts(settings.servers)) > settings.servers:
        raise UsageError("--fail-fraction, --hang-fraction and --slow-fraction add up to more than the fleet")
    try:
        server = serve_simulator(settings)
    except OSError as error:
        raise UsageError("cannot listen on %s port %d: %s" % (settings.host, settings.port, error.strerror or error))
    fail, hang, slow = sickness.counts(settings.servers)
    sick = ", ".join("%d %s" % (n, what) for n, what in ((fail, "answer HTTP 500"), (hang, "hang"),
                                                          (slow, "answer %g ms late" % sickness.slow_ms)) if n)
    say("%s: simulating %d servers%s, listening on %s (Ctrl+C to stop)"
        % (PROG, settings.servers, " (%s)" % sick if sick else "", server.url))
    try:
        while True:
            time.sleep(3600)
    finally:  # Ctrl+C (130) and SIGTERM (143) reach main() as for any command
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------
# Argument parser and main()
# ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, "%s: error: %s (see '%s --help')\n" % (PROG, message, self.prog))

    def _print_message(self, message: str, file: Any = None) -> None:
        # Help and version to stdout, messages to stderr, through the one output path:
        # `--help >/dev/full` is exit 74 with one line, `2>&-` is no crash.
        if not message:
            return
        if file is sys.stdout and file is not None:
            emit(message)
        else:
            say(message.rstrip("\n"))

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        # argparse's own check, plus the closest choice: a typo'd command or sort key.
        choices = action.choices
        if choices is not None and isinstance(value, str) and value not in choices:
            names = [str(choice) for choice in choices]
            raise argparse.ArgumentError(action, "invalid choice: %r%s (choose from %s)" % (
                sanitize(value), _suggestion(value, names), ", ".join(names)))
        super()._check_value(action, value)


def _seconds(text: str) -> float:
    """A duration option: a positive number of seconds, at most MAX_SECONDS."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number" % text)
    if not 0 < value <= MAX_SECONDS:  # written so that NaN fails too
        raise argparse.ArgumentTypeError("%r must be a number of seconds above 0 and at most %d (a day)"
                                         % (text, MAX_SECONDS))
    return value


def _float_in(low: float, high: float, what: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a number" % text)
        if not low <= value <= high:  # written so that NaN fails too
            raise argparse.ArgumentTypeError("%r must be %s from %.10g to %.10g" % (text, what, low, high))
        return value
    return parse


def _interval(text: str) -> float:
    value = _seconds(text)
    if value < MIN_INTERVAL:
        raise argparse.ArgumentTypeError("%r is below the minimum interval of %g s" % (text, MIN_INTERVAL))
    return value


def _int_in(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a whole number" % text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError("%r must be from %d to %d" % (text, low, high))
        return value
    return parse


def _service_names(text: str) -> List[str]:
    """--service and status's SERVICE: a name or shell-style pattern, or several, comma-separated."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError("%r has an empty service name" % text)
    return names


def _status_names(text: str) -> List[str]:
    """--status: healthy, unhealthy or unknown (any case), or several, comma-separated."""
    names = [name.strip().lower() for name in text.split(",")]
    for name in names:
        if name not in STATUS_FILTERS:
            raise argparse.ArgumentTypeError("unknown status %r%s (choose from %s)" % (
                sanitize(name), _suggestion(name, STATUS_FILTERS), ", ".join(STATUS_FILTERS)))
    return names


def _shard(text: str) -> Shard:
    """--shard K/N: slice K (1 to N) of N."""
    match = re.match(r"([0-9]{1,6})/([0-9]{1,6})\Z", text.strip())
    if not match:
        raise argparse.ArgumentTypeError("%r is not K/N (shard K of N, such as 1/4)" % text)
    index, count = int(match.group(1)), int(match.group(2))
    if not 1 <= index <= count:
        raise argparse.ArgumentTypeError("%r: K must be from 1 to N" % text)
    return Shard(index, count)


def _min_healthy_option(text: str) -> MinHealthy:
    try:
        minimum = parse_min_healthy(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))
    if isinstance(minimum, HealthyCount) and minimum.count < 1:
        raise argparse.ArgumentTypeError("%r must be 1 or more" % text)
    return minimum


def _percent_option(text: str) -> float:
    try:
        return parse_percent(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a percentage from 0 to 100" % text)


def _add_global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Global options; on subcommands their defaults are suppressed so either position works."""
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("global options")
    if suppress:  # the top parser has its own, above the global options
        group.add_argument("--version", action="version", version=_version_line())
    group.add_argument("--url", default=default(None),
                       help="CPX API base URL (default: $CPX_URL, else %s)" % DEFAULT_URL)
    group.add_argument("--timeout", type=_seconds, default=default(DEFAULT_TIMEOUT), metavar="SECONDS",
                       help="per-request timeout, for its whole life: connect, headers, body "
                            "(default %g)" % DEFAULT_TIMEOUT)
    group.add_argument("--deadline", type=_seconds, default=default(None), metavar="SECONDS",
                       help="time limit for a whole command (default %g); for track, for a sample's "
                            "/servers and again for its reads (default: the interval, at least 1 s; a full "
                            "read of the fleet gets %g s)"
                       % (DEFAULT_DEADLINE, DEFAULT_DEADLINE))
    group.add_argument("--retries", type=_int_in(0, 10), default=default(DEFAULT_RETRIES), metavar="N",
                       help="retries of a failed request: connection errors, timeouts, "
                            "HTTP 429/502/503/504 (default %d)" % DEFAULT_RETRIES)
    group.add_argument("--workers", type=_int_in(1, 1024), default=default(DEFAULT_WORKERS), metavar="N",
                       help="most requests in flight at once (default %d); how many are is adapted "
                            "to the server's latency, and requests stuck on a hanging or slow "
                            "instance stop counting, in up to N more threads" % DEFAULT_WORKERS)
    group.add_argument("--concurrency", choices=("adaptive", "fixed"), default=default("adaptive"),
                       help="adaptive (default) or fixed at --workers")
    group.add_argument("--cpu-threshold", type=_percent_option, default=default(None), metavar="PCT",
                       help="Unhealthy above this cpu, for every service (default: the policy's, else %g)"
                            % DEFAULT_THRESHOLD)
    group.add_argument("--mem-threshold", type=_percent_option, default=default(None), metavar="PCT",
                       help="Unhealthy above this memory, for every service (default: the policy's, else %g)"
                            % DEFAULT_THRESHOLD)
    group.add_argument("--policy", metavar="FILE", default=default(None),
                       help="the fleet's policy (INI): expected services, their minimum of healthy instances "
                            "and thresholds (default: $CPX_POLICY; an option given beats the file)")
    group.add_argument("--shard", metavar="K/N", type=_shard, default=default(None),
                       help="read only slice K of N of the fleet (a stable hash of each IP), for N exporters "
                            "whose outputs Prometheus sums")
    group.add_argument("-o", "--output", choices=OUTPUT_FORMATS, default=default("table"),
                       help="output format (default table)")
    group.add_argument("-q", "--quiet", action="store_true", default=default(False),
                       help="hide warnings (errors always show)")
    group.add_argument("--no-headers", action="store_true", default=default(False),
                       help="no header row (table, csv) and no summary line under a table")
    group.add_argument("--write", metavar="FILE", default=default(None),
                       help="write the output to FILE atomically (temporary file, then rename), "
                            "e.g. for node_exporter's textfile collector")
    group.add_argument("--color", choices=COLOR_MODES, default=default("auto"),
                       help="colour: auto (on a terminal, unless $NO_COLOR or TERM=dumb; the default), always "
                            "(watch -c), or never; a --write file is never coloured")
    group.add_argument("--no-color", dest="color", action="store_const", const="never", default=default("auto"),
                       help="the same as --color never")
    group.add_argument("-v", "--verbose", action="store_true", default=default(False),
                       help="say on stderr how the fetch went (time, concurrency, retries)")


def _version_line() -> str:
    return "%s %s" % (os.path.basename(sys.argv[0]) or "cpx_devops.py", __version__)


def build_parser() -> argparse.ArgumentParser:
    """The command line: global options before or after a subcommand."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog=os.path.basename(sys.argv[0]) or "cpx_devops.py",
                     description="See the health of a CPX fleet in seconds.",
                     epilog="examples:\n"
                            "  cpx_devops.py services --sort cpu\n"
                            "  cpx_devops.py status UserService\n"
                            "  cpx_devops.py unhealthy || page-oncall\n"
                            "  cpx_devops.py track UserService -n 1\n"
                            "  cpx_devops.py track                 (the whole fleet)\n"
                            "  cpx_devops.py simulate --port 8080\n\n"
                            + ENVIRONMENT_HELP + "\n" + EXIT_STATUS_HELP,
                     formatter_class=formatter, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=_version_line())
    _add_global_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def add(name: str, help_text: str, examples: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  epilog="examples:\n" + examples + "\n" + ENVIRONMENT_HELP + "\n" + EXIT_STATUS_HELP,
                                  formatter_class=formatter, allow_abbrev=False)
        _add_global_options(sub, suppress=True)
        return sub

    services = add("services", "every instance: IP, service, status, cpu, memory",
                   "  cpx_devops.py services\n  cpx_devops.py services --service UserService --sort cpu\n"
                   "  cpx_devops.py services -o csv > fleet.csv\n")
    services.add_argument("--service", metavar="NAME", type=_service_names, action="append", default=[],
                          help="only these services' instances: a name, a shell-style pattern ('Pay*'), "
                               "comma-separated or repeated")
    services.add_argument("--status", metavar="STATUS", type=_status_names, action="append", default=[],
                          help="only instances in this status: healthy, unhealthy or unknown "
                               "(comma-separated or repeated)")
    services.add_argument("--sort", choices=SORT_KEYS, default="service",
                          help="row order (default: service, then IP numerically; cpu/memory highest first)")

    status = add("status", "per service: instances, healthy, average and maximum cpu and memory",
                 "  cpx_devops.py status\n  cpx_devops.py status UserService -o json\n"
                 "  cpx_devops.py status 'Pay*,Auth*' -o wide\n  cpx_devops.py status --sort cpu\n")
    status.add_argument("service", nargs="*", type=_service_names, metavar="SERVICE",
                        help="only these services: names or shell-style patterns, comma-separated or several")
    status.add_argument("--sort", choices=SUMMARY_SORT_KEYS, default="service",
                        help="row order (default: service; instances most first, healthy fewest first, "
                             "cpu/memory highest average first)")

    unhealthy = add("unhealthy", "services with fewer than N healthy instances (exit 1 if any)",
                    "  cpx_devops.py unhealthy\n  cpx_devops.py unhealthy --min-healthy 3 -o json\n")
    for snapshot_command in (services, status, unhealthy):
        snapshot_command.add_argument("--reverse", action="store_true", help="the rows in the opposite order")
        snapshot_command.add_argument("--strict", action="store_true",
                                      help="partial data is a failure: exit %d after the output when any instance "
                                           "could not be read (unhealthy: 1 when it flags)" % EXIT_PARTIAL)
    unhealthy.add_argument("--min-healthy", type=_min_healthy_option, default=None, metavar="N|PCT%",
                           help="flag services with fewer healthy instances than this, a count or a share of "
                                "their instances (50%%%%), for every service (default: the policy's, else %d)"
                                % DEFAULT_MIN_HEALTHY)

    track = add("track", "a live view of one service, or of the whole fleet, until q or Ctrl+C",
                "  cpx_devops.py track UserService\n  cpx_devops.py track UserService -n 0.5 -c 20 -o json\n"
                "  cpx_devops.py track          (the whole fleet, a row per service)\n")
    watched = track.add_mutually_exclusive_group()
    watched.add_argument("service", nargs="?", metavar="SERVICE",
                         help="the service to watch, a row per instance (default: the whole fleet)")
    watched.add_argument("--all", action="store_true",
                         help="the whole fleet, a row per service, worst first (the default without SERVICE)")
    track.add_argument("-n", "--interval", type=_interval, default=DEFAULT_INTERVAL, metavar="SECONDS",
                       help="time between sample starts, %g or more (default %g)" % (MIN_INTERVAL, DEFAULT_INTERVAL))
    track.add_argument("-c", "--count", type=_int_in(1, 10 ** 9), metavar="N", help="stop after N samples")
    track.add_argument("--rediscover", type=_seconds, default=DEFAULT_REDISCOVER, metavar="SECONDS",
                       help="re-read the whole fleet this often (default %g); /servers is checked every "
                            "sample and new instances are read at once" % DEFAULT_REDISCOVER)

    completion = commands.add_parser("completion", help="print a shell completion script (bash, zsh or fish)",
                                     description="A completion script for your shell, made from this parser.",
                                     epilog="examples:\n  source <(cpx_devops.py completion bash)\n"
                                            "  cpx_devops.py completion fish > ~/.config/fish/completions/"
                                            "cpx-devops.fish\n  make install   (installs the bash one)\n",
                                     formatter_class=formatter, allow_abbrev=False)
    completion.add_argument("shell", choices=SHELLS, help="the shell to complete for")

    simulate = commands.add_parser("simulate", help="a CPX-compatible API server on loopback",
                                   description="A CPX-compatible API server for demos and tests.",
                                   epilog="examples:\n  cpx_devops.py simulate\n"
                                          "  cpx_devops.py simulate --port 0 --servers 1000 --latency-ms 20\n"
                                          "  cpx_devops.py simulate --latency-ms 20 --hang-fraction 0.07 "
                                          "--slow-fraction 0.5\n\n" + SIMULATE_HELP,
                                   formatter_class=formatter, allow_abbrev=False)
    simulate.add_argument("--version", action="version", version=_version_line())
    simulate.add_argument("--host", default="127.0.0.1",
                          help="address to listen on (default 127.0.0.1; ::1 for IPv6)")
    simulate.add_argument("--port", type=_int_in(0, 65535), default=8080,
                          help="port (default 8080; 0 picks a free one)")
    simulate.add_argument("--servers", type=_int_in(1, 1000000), default=150, help="fleet size (default 150)")
    simulate.add_argument("--latency-ms", type=_float_in(0, 3600000, "milliseconds"), default=0.0, metavar="MS",
                          help="delay before every answer (default 0)")
    simulate.add_argument("--seed", type=int, default=None, help="random seed, for a reproducible fleet")
    simulate.add_argument("--single-threaded", action="store_true",
                          help="answer one request at a time with a listen backlog of 5, "
                               "like the reference server")
    simulate.add_argument("--fail-fraction", type=_float_in(0, 1, "a fraction"), default=0.0, metavar="F",
                          help="this fraction of the instances answer HTTP 500 at once (default 0)")
    simulate.add_argument("--hang-fraction", type=_float_in(0, 1, "a fraction"), default=0.0, metavar="F",
                          help="this fraction never answer, until the client gives up (default 0)")
    simulate.add_argument("--slow-fraction", type=_float_in(0, 1, "a fraction"), default=0.0, metavar="F",
                          help="this fraction answer --slow-ms late (default 0); each fraction is at least "
                               "one instance when above 0, and the seed picks which")
    simulate.add_argument("--slow-ms", type=_float_in(0, 3600000, "milliseconds"), default=700.0, metavar="MS",
                          help="how late the slow instances answer (default 700)")
    return parser


# Shell completion, generated from the parser itself so that it cannot drift from it.
COMPLETED_NAMES = ("cpx-devops", "cpx_devops.py")  # what `make install` installs, and the file
SHELLS = ("bash", "zsh", "fish")


@dataclass
class CompletedOption:
    """One option as completion sees it: its spellings, and what its value is: a fixed
    choice, a file, a service name, a value of the user's, or none (a flag)."""

    spellings: Sequence[str]
    value: str = "none"  # "choice", "file", "service", "other" or "none"
    choices: Sequence[str] = ()


@dataclass
class CompletedCommand:
    """What one command (\"\" for the program itself) completes: its options, and its
    positional argument (fixed words, or "@services" for service names)."""

    options: List[CompletedOption] = field(default_factory=list)
    positional: Sequence[str] = ()


def completion_table(parser: argparse.ArgumentParser) -> Dict[str, CompletedCommand]:
    """Per command (and \"\" for the program), what to complete, read from the parser."""
    def read(command_parser: argparse.ArgumentParser) -> CompletedCommand:
        command = CompletedCommand()
        for action in command_parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                command.positional = list(action.choices)
            elif not action.option_strings:
                command.positional = ([str(c) for c in action.choices] if action.choices
                                      else ["@services"] if action.dest == "service" else [])
            elif action.nargs == 0:
                command.options.append(CompletedOption(action.option_strings))
            elif action.choices or action.dest == "status":
                choices = STATUS_FILTERS if action.dest == "status" else [str(c) for c in action.choices or ()]
                command.options.append(CompletedOption(action.option_strings, "choice", choices))
            else:
                value = {"write": "file", "policy": "file", "service": "service"}.get(action.dest, "other")
                command.options.append(CompletedOption(action.option_strings, value))
        return command

    table = {"": read(parser)}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            table.update((name, read(command_parser)) for name, command_parser in action.choices.items())
    return table


# Service names come from the cache a snapshot run on a terminal leaves (SERVICE_CACHE, below the
# cache home); with CPX_COMPLETE_LIVE set, a `status` run refreshes it first. They are CPX's
# words, so each shell only compares them, as plain strings, with what was typed (no compgen -W,
# no eval, no unquoted expansion) and inserts them quoted; a cache that is not the user's own
# regular file is not read.
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
             "    local name quoted typed=${cur#[\\\"\\']} cache=${XDG_CACHE_HOME:-$HOME/.cache}/%(cache)s\n"
             "    typed=${typed//\\\\/}\n"
             '    [ -n "${CPX_COMPLETE_LIVE:-}" ] && "${COMP_WORDS[0]}" -q status >/dev/null 2>&1\n'
             '    [ -f "$cache" ] && [ ! -L "$cache" ] && [ -O "$cache" ] || return\n'
             "    while IFS= read -r name; do\n"
             '        case $name in ""|-*|*[[:cntrl:]]*) continue;; esac\n'
             '        [[ $name == "$typed"* ]] && printf -v quoted %%q "$name" && COMPREPLY+=("$quoted")\n'
             '    done < "$cache"\n'
             "}\n"
             "_cpx_devops() {\n"
             "    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]} command= i\n"
             "    COMPREPLY=()\n"
             "    for ((i = 1; i < COMP_CWORD; i++)); do\n"
             "        case ${COMP_WORDS[i]} in %(commands)s) command=${COMP_WORDS[i]}; break;; esac\n"
             "    done\n"),
    "zsh": ("# zsh completion for cpx_devops, made by `cpx_devops.py completion zsh` from its parser.\n"
            "# It needs zsh's completion system: 'autoload -Uz compinit && compinit' in ~/.zshrc, before it.\n"
            "if (( ! $+functions[compdef] )); then\n"
            "    print -u2 \"cpx_devops: add 'autoload -Uz compinit && compinit' to ~/.zshrc, before this script\"\n"
            "    return 1\n"
            "fi\n"
            "_cpx_devops_words() { compadd -- \"$@\" }\n"
            "_cpx_devops_files() { _files }\n"
            "_cpx_devops_services() {\n"
            "    emulate -L zsh\n"
            "    local cache=${XDG_CACHE_HOME:-$HOME/.cache}/%(cache)s\n"
            "    local -a names\n"
            '    [[ -n ${CPX_COMPLETE_LIVE:-} ]] && "${words[1]}" -q status >/dev/null 2>&1\n'
            "    [[ -f $cache && ! -L $cache && -O $cache ]] || return\n"
            '    names=("${(@f)$(<$cache)}")\n'
            '    compadd -- "${(@)names:#(|-*|*[[:cntrl:]]*)}"\n'
            "}\n"
            "_cpx_devops() {\n"
            "    emulate -L zsh\n"
            "    local cur=${words[CURRENT]} prev=${words[CURRENT-1]} command= i\n"
            "    for ((i = 2; i < CURRENT; i++)); do\n"
            "        case ${words[i]} in %(commands)s) command=${words[i]}; break;; esac\n"
            "    done\n"),
}
_SHELL_EPILOGUES = {"bash": "}\ncomplete -F _cpx_devops %(names)s\n", "zsh": "}\ncompdef _cpx_devops %(names)s\n"}


def _case_completion(table: Dict[str, CompletedCommand], shell: str) -> str:
    """bash's or zsh's script: one function, shared but for the prologue, that completes an
    option's value by `command/previous word`, else the command's options or positional words."""
    replies = {"file": "_cpx_devops_files", "service": "_cpx_devops_services", "other": ":"}
    by_reply: Dict[str, List[Tuple[str, str]]] = OrderedDict()  # reply -> (command, option) pairs
    meanings: Dict[str, Set[str]] = {}  # option -> its replies in every command
    for name, command in table.items():
        for option in command.options:
            if option.value != "none":
                reply = replies.get(option.value) or "_cpx_devops_words " + " ".join(option.choices)
                for spelling in option.spellings:
                    by_reply.setdefault(reply, []).append((name, spelling))
                    meanings.setdefault(spelling, set()).add(reply)
    lines = [_SHELL_PROLOGUES[shell].rstrip("\n") % {"cache": "/".join(SERVICE_CACHE),
                                        "commands": "|".join(name for name in table if name)},
             '    case "$command/$prev" in']
    for reply, pairs in by_reply.items():  # an option that means one thing everywhere: */option
        patterns = OrderedDict(("*/" + spelling if len(meanings[spelling]) == 1 else name + "/" + spelling, None)
                               for name, spelling in pairs)
        lines.append("        %s) %s; return;;" % ("|".join(patterns), reply))
    lines += ["    esac", '    case "$command" in']
    for name, command in table.items():
        options = "_cpx_devops_words " + " ".join(s for option in command.options for s in option.spellings)
        positional = ("_cpx_devops_services" if list(command.positional) == ["@services"] else
                      "_cpx_devops_words " + " ".join(command.positional))
        lines.append("        '%s') %s;;" % (name, 'if [[ $cur == -* ]]; then %s; else %s; fi' % (
            options, positional) if command.positional else options))
    lines.append("    esac")
    return "\n".join(lines) + "\n" + _SHELL_EPILOGUES[shell] % {"names": " ".join(COMPLETED_NAMES)}


def _fish_completion(table: Dict[str, CompletedCommand]) -> str:
    lines = ["# fish completion for cpx_devops, made by `cpx_devops.py completion fish` from its parser.",
             "function __cpx_devops_services",
             "    set -l cache $HOME/.cache/%s" % "/".join(SERVICE_CACHE),
             "    set -q XDG_CACHE_HOME; and set cache $XDG_CACHE_HOME/%s" % "/".join(SERVICE_CACHE),
             "    set -l program (commandline -opc)[1]",
             "    set -q CPX_COMPLETE_LIVE; and $program -q status >/dev/null 2>&1",
             "    test -f $cache -a ! -L $cache -a -O $cache; or return",
             "    string match -rv -- '^$|^-|[[:cntrl:]]' <$cache",
             "end"]
    commands = [name for name in table if name]
    for program in COMPLETED_NAMES:
        lines.append("complete -c %s -f" % program)
        for name, command in table.items():
            condition = ("__fish_use_subcommand" if not name else "__fish_seen_subcommand_from %s" % name)
            head = "complete -c %s -n '%s'" % (program, condition)
            if not name:
                lines.append("%s -a '%s'" % (head, " ".join(commands)))
            elif list(command.positional) == ["@services"]:
                lines.append("%s -a '(__cpx_devops_services)'" % head)
            elif command.positional:
                lines.append("%s -a '%s'" % (head, " ".join(command.positional)))
            for option in command.options:
                spec = head + "".join(" -l %s" % s[2:] if s.startswith("--") else " -s %s" % s[1:]
                                      for s in option.spellings)
                spec += {"choice": " -x -a '%s'" % " ".join(option.choices), "file": " -r -F",
                         "service": " -x -a '(__cpx_devops_services)'", "other": " -x"}.get(option.value, "")
                lines.append(spec)
    return "\n".join(lines) + "\n"


def completion_script(shell: str, parser: argparse.ArgumentParser) -> str:
    """The completion script for bash, zsh or fish."""
    table = completion_table(parser)
    return _fish_completion(table) if shell == "fish" else _case_completion(table, shell)


def read_policy(path: str, source: str) -> Policy:
    """The policy in a file (UTF-8 INI); UsageError, one line, when it cannot be read or is wrong.
    Only a regular file is read: opened without blocking, so that a FIFO is refused at once."""
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
        raise UsageError("policy %s: more than %s; is it the right file?" % (sanitize(path), _size(POLICY_SIZE_CAP)))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = len(_POLICY_LINE_ENDS.split(data[:error.start].decode("ascii", "replace")))
        raise UsageError("policy %s, line %d: not UTF-8 text" % (sanitize(path), line))
    return parse_policy(text, path)


def use_color(stream: Any, mode: str, environ: Dict[str, str]) -> bool:
    """--color always: colour; never: none; auto: only on a terminal, and not with NO_COLOR set
    and non-empty, or TERM=dumb."""
    if mode != "auto":
        return mode == "always"
    return (not environ.get("NO_COLOR") and environ.get("TERM") != "dumb"
            and hasattr(stream, "isatty") and stream.isatty())


def options_from_args(args: argparse.Namespace, environ: Dict[str, str]) -> Options:
    """The options record for a command, from parsed arguments and the environment."""
    if args.url is not None:
        url, authorization = parse_base_url(args.url, "--url")
    elif environ.get("CPX_URL"):
        url, authorization = parse_base_url(environ["CPX_URL"], "$CPX_URL")
    else:
        url, authorization = DEFAULT_URL, None
    interactive = sys.stdout is not None and sys.stdout.isatty() and environ.get("TERM") != "dumb"
    cache_home = environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(cache_home):  # as the XDG spec says: a relative one is ignored
        cache_home = os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".cache")
    policy_file = args.policy if args.policy is not None else environ.get("CPX_POLICY") or None
    policy = read_policy(policy_file, "--policy" if args.policy is not None else "$CPX_POLICY") if policy_file \
        is not None else Policy()
    policy = policy.overridden(args.cpu_threshold, args.mem_threshold, getattr(args, "min_healthy", None))
    return Options(url=url, authorization=authorization, timeout=args.timeout,
                   deadline=args.deadline if args.deadline is not None else DEFAULT_DEADLINE,
                   retries=args.retries, workers=args.workers, adaptive=args.concurrency == "adaptive",
                   policy=policy, shard=args.shard,
                   output=args.output, quiet=args.quiet, verbose=args.verbose,
                   # Never colour a file: --write's codes would be read by a collector, not a terminal.
                   color=args.write is None and use_color(sys.stdout, args.color, environ),
                   interactive=interactive,
                   headers=not args.no_headers, write=args.write,
                   service_cache=os.path.join(cache_home, *SERVICE_CACHE)
                   if interactive or environ.get("CPX_COMPLETE_LIVE") else None)


COMMANDS = {"services": cmd_services, "status": cmd_status, "unhealthy": cmd_unhealthy}


def simulator_settings(args: argparse.Namespace) -> SimulatorSettings:
    """simulate's settings record, from parsed arguments."""
    return SimulatorSettings(args.host, args.port, args.servers, args.latency_ms, args.seed, args.single_threaded,
                             Sickness(args.fail_fraction, args.hang_fraction, args.slow_fraction, args.slow_ms))


def snapshot_settings(args: argparse.Namespace) -> SnapshotSettings:
    """A snapshot command's settings record, from parsed arguments."""
    def flat(lists: Sequence[Sequence[str]]) -> Tuple[str, ...]:
        return tuple(name for names in lists for name in names)

    return SnapshotSettings(services=flat(getattr(args, "service", None) or ()),
                            statuses=flat(getattr(args, "status", None) or ()),
                            sort=getattr(args, "sort", "service"), reverse=args.reverse, strict=args.strict)


def track_settings(args: argparse.Namespace) -> TrackSettings:
    """track's settings record, from parsed arguments."""
    return TrackSettings(service=args.service, interval=args.interval, count=args.count,
                         rediscover=args.rediscover, deadline=args.deadline)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, build the options and run one command; exceptions are left to main()."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "simulate":
        return cmd_simulate(simulator_settings(args))
    if args.command == "completion":
        emit(completion_script(args.shell, parser))
        return EXIT_OK
    options = options_from_args(args, dict(os.environ))
    settings = track_settings(args) if args.command == "track" else None
    if options.write is not None and settings is None:
        check_writable(options.write)
    elif sys.stdout is None:
        raise UsageError("stdout is closed (>&-): nowhere to write the output; use --write FILE")
    client = CpxClient(options)
    interrupted = False
    try:
        if settings is not None:
            return cmd_track(client, options, settings)
        return COMMANDS[args.command](client, options, snapshot_settings(args))
    except (KeyboardInterrupt, Terminated):
        # Left open: the process ends at once (os._exit), and an interrupt that lands
        # inside one of the pool's `with lock:` blocks can leave that lock held
        # (bpo-29988), on which close() would wait for ever (seen: Ctrl+C ignored).
        interrupted = True
        raise
    finally:
        if not interrupted:
            client.close()


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush is quiet too."""
    if sys.stdout is not None:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The program: one line on stderr for any failure, an exit status from the contract."""
    try:
        if signal.getsignal(signal.SIGINT) is _interrupted_at_start:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # start-up is over
        signal.signal(signal.SIGTERM, _on_sigterm)
        return run(argv)
    except UsageError as error:
        say("%s: error: %s" % (PROG, error))
        return EXIT_USAGE
    except CpxUnavailable as error:
        say("%s: error: %s%s" % (PROG, error.prefix, error))
        return EXIT_UNAVAILABLE
    except OutputFailed as error:
        say("%s: error: %s" % (PROG, error))
        _quiet_stdout()
        return EXIT_OUTPUT
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Terminated:
        return EXIT_TERMINATED
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE


def _exit(code: int) -> None:
    """Exit now: requests still in flight must not hold the process (Ctrl+C, deadline)."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
        code = code or EXIT_BROKEN_PIPE
    except (OSError, ValueError):
        _quiet_stdout()
        code = code or EXIT_OUTPUT
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
