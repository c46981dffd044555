"""Where a running `infermesh up` keeps its state, and the run file that describes it.

The state directory holds the bus's generated credentials, the per-process logs and ``run.json``:
who started the system (pid), where the bus is, and which identity a local observer uses. Tools
such as `infermesh events tail` read it, so the commands `up` prints work without flags; the next
`up` reads it to find a run that is still going (or one that died and left processes behind).
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

RUN_FILE = "run.json"


def default_state_dir() -> Path:
    """``$INFERMESH_STATE_DIR``, else ``$XDG_STATE_HOME/infermesh``, else
    ``~/.local/state/infermesh``."""
    explicit = os.environ.get("INFERMESH_STATE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
    return base / "infermesh"


class RunProcess(msgspec.Struct, kw_only=True):
    """One supervised process of a run (its process group has the same id)."""

    name: str
    pid: int


class RunFile(msgspec.Struct, kw_only=True):
    """``<state dir>/run.json``: a running (or crashed) `infermesh up`."""

    pid: int
    started: float
    state_dir: str
    nats_url: str = ""
    subject_prefix: str = "im"
    ingress_url: str = ""
    # Files a local observer (`infermesh events tail`) connects with; empty when the bus has
    # no users or no TLS.
    observer_credentials: str = ""
    nats_tls_ca: str = ""
    processes: list[RunProcess] = msgspec.field(default_factory=list)


def run_file_path(state_dir: str | Path | None = None) -> Path:
    """The run file of ``state_dir`` (default: :func:`default_state_dir`)."""
    return Path(state_dir or default_state_dir()) / RUN_FILE


def read_run_file(state_dir: str | Path | None = None) -> RunFile | None:
    """The run file of ``state_dir``, or None when there is none (or it does not decode)."""
    try:
        return msgspec.json.decode(run_file_path(state_dir).read_bytes(), type=RunFile)
    except (OSError, msgspec.DecodeError):
        return None


def write_run_file(run: RunFile) -> Path:
    """Write ``run`` atomically into its state directory."""
    path = run_file_path(run.state_dir)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(run)))
    os.replace(tmp, path)
    return path


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (and is not a zombie we could reap)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True
