"""`infermesh up`: the whole system on one machine, on the embedded defaults.

Starts nats-server (or a routed cluster of them), the engines (simulated, or real vLLM launched by
their agents), an agent per engine, the tokenizer, indexer, scheduler, ingress and fleet console;
prints what runs where; restarts a process that dies (with backoff); stops everything on Ctrl-C
or SIGTERM.
Every child dies with this process, even when it is killed with SIGKILL; a run that died that
way is found (its run.json) and cleaned up by the next `infermesh up`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from infermesh.libs.config import ConfigError, add_arguments, load_config
from infermesh.libs.process.ports import PortBusy
from infermesh.libs.process.process import group_alive
from infermesh.libs.process.ready import NotReady
from infermesh.libs.process.runfile import (
    RunFile,
    RunProcess,
    pid_alive,
    read_run_file,
    run_file_path,
    write_run_file,
)
from infermesh.libs.telemetry import configure_logging, get_logger

from .plan import SystemPlan, plan
from .run import LocalSystem
from .spec import SystemSpec, parse_settings

log = get_logger("up")


class _Stop(BaseException):
    """Ctrl-C or SIGTERM while the system was starting."""


def build_parser(prog: str = "infermesh up", description: str = __doc__ or ""
                 ) -> argparse.ArgumentParser:
    """`infermesh up`'s command line: one flag per SystemSpec field, plus ``--set``."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with any of the options below (and `settings`)")
    p.add_argument("--set", dest="set_", action="append", default=[], metavar="SERVICE.FIELD=V",
                   help="a setting of one service, e.g. --set ingress.schedule_timeout_s=2 "
                   "(any flag of `infermesh SERVICE --help`, with _ for -); repeatable")
    p.add_argument("--ready-timeout", type=float, default=240.0,
                   help="seconds to wait for everything to serve (default: 240; real vLLM "
                   "engines take ~40 s)")
    p.add_argument("--exit-after-ready", action="store_true",
                   help="stop everything once all is up (a smoke test)")
    add_arguments(p, SystemSpec)
    return p


def spec_from_args(args: argparse.Namespace) -> SystemSpec:
    """The spec the flags, the ``--config`` file and ``INFERMESH_UP_*`` describe."""
    spec = load_config(SystemSpec, args, env_prefix="INFERMESH_UP", file=args.config)
    for service, values in parse_settings(args.set_).items():
        spec.settings.setdefault(service, {}).update(values)
    try:
        spec.__post_init__()  # --set may name a service that does not exist
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return spec


def infermesh_command() -> str:
    """How to run `infermesh` again, as the user would type it (the venv's script)."""
    script = Path(sys.executable).parent / "infermesh"
    if not script.exists():
        return "infermesh"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def clean_stale_run(state_dir: Path) -> None:
    """Refuse to start over a live run; clean up after a dead one.

    A run killed with SIGKILL cannot stop its children, but they die with it (they are tied to
    it); a run whose children were started some other way may leave some: they are stopped.
    """
    run = read_run_file(state_dir)
    if run is None:
        return
    if run.pid != os.getpid() and pid_alive(run.pid):
        raise SystemExit(
            f"infermesh up: already running (pid {run.pid}, state dir {state_dir}, OpenAI API "
            f"{run.ingress_url or '?'}); stop it first (kill {run.pid}), or use another "
            "--state-dir and other ports")
    left = [p for p in run.processes if group_alive(p.pid)]
    for p in left:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    print(f"infermesh up: the run of pid {run.pid} in {state_dir} ended without stopping"
          + (f"; stopped what it left running: {', '.join(p.name for p in left)}"
             if left else "; nothing of it was left running"), file=sys.stderr)
    run_file_path(state_dir).unlink(missing_ok=True)


def _run_file(system: LocalSystem, plan_: SystemPlan) -> RunFile:
    spec = plan_.spec
    observer = plan_.credentials("observer") if spec.bus_auth else None
    return RunFile(
        pid=os.getpid(), started=time.time(), state_dir=str(plan_.state_dir),
        nats_url=plan_.nats_url, subject_prefix=spec.subject_prefix,
        ingress_url=plan_.ingress_urls[0],
        observer_credentials=str(observer) if observer else "",
        nats_tls_ca=str(Path(spec.nats_tls_ca).resolve()) if spec.nats_tls_ca else "",
        processes=[RunProcess(name=n, pid=p.pid) for n, p in system.supervisor.procs.items()
                   if p.pid is not None],
    )


def summary(plan_: SystemPlan) -> list[str]:
    """What `up` prints once the system serves."""
    spec = plan_.spec
    lines = ["", "infermesh is up"]
    for url in plan_.ingress_urls:
        lines.append(f"  OpenAI API      {url}/v1  (ingress; header x-infermesh-endpoint names "
                     "the engine)")
    for p in plan_.of_kind("console"):
        lines.append(f"  {'console':<15} {p.links['console']}  (the fleet, live: pods, routing "
                     "decisions, hit rate, autoscaler)")
    for p in plan_.of_kind("nats"):
        lines.append(f"  {p.name:<15} {p.links['NATS']}  (monitor {p.links['monitor']})")
    if not plan_.of_kind("nats"):
        lines.append(f"  nats            {plan_.nats_url}  (not started here)")
    for p in plan_.processes:
        for k, v in p.links.items():
            if k.startswith("engine "):
                kv = [port.number for port in p.ports if port.what.endswith(
                    f"{k[len('engine '):]} KV events")]
                events = f"; KV events tcp://{spec.host}:{kv[0]}" if kv else ""
                parked = "; parked: the autoscaler starts it" if p.parked else ""
                lines.append(f"  {k:<15} {v}  (OpenAI API{events}{parked})")
    for p in plan_.processes:
        if p.kind in ("agent", "tokenizer", "indexer", "scheduler", "autoscaler") \
                and "metrics" in p.links:
            lines.append(f"  {p.name:<15} {p.links['metrics']}  (and /health)")
    lines.append(f"  model           {plan_.served_model}  from {plan_.model_dir}")
    lines.append(f"  state           {plan_.state_dir}  (logs/ has one log per process)")
    cmd = infermesh_command()
    state = (f" --state-dir {plan_.state_dir}"
             if plan_.state_dir != _default_state() else "")
    lines.append(f"  watch the bus   {cmd} events tail '{spec.subject_prefix}.>'{state}")
    if spec.autoscale:
        lines.append(f"  autoscaling     {cmd} events tail '{spec.subject_prefix}.scale.*'{state}"
                     "  (decisions; engines are started and drained on them here)")
    if spec.bus_auth:
        lines.append(f"  bus security    one NATS user per service; credentials in "
                     f"{plan_.bus_dir / 'credentials'} (docs/security.md)")
    lines += ["Ctrl-C stops everything.", ""]
    return lines


def _default_state() -> Path:
    from infermesh.libs.process.runfile import default_state_dir

    return default_state_dir().resolve()


def _check_engines(plan_: SystemPlan) -> None:
    spec = plan_.spec
    if spec.engine != "vllm":
        from infermesh.libs.tinymodel import ensure_model_folder

        if not spec.model:
            ensure_model_folder(plan_.model_dir)
        return
    from infermesh.libs.tinymodel import has_weights

    for p in plan_.of_kind("agent"):
        command = p.argv[p.argv.index("--vllm-command") + 1]
        if not Path(command).exists():
            raise SystemExit(f"infermesh up: {command} is missing: run `make vllm-env` "
                             "(make up ENGINE=vllm does)")
        break
    if not spec.model and not has_weights(plan_.model_dir):
        raise SystemExit(f"infermesh up: the tiny model in {plan_.model_dir} has no weights "
                         "for vLLM: run `make vllm-env`")


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    try:
        spec = spec_from_args(args)
        plan_ = plan(spec)
    except ConfigError as e:
        print(f"infermesh up: {e}", file=sys.stderr)
        return 2
    configure_logging("up")
    _check_engines(plan_)
    clean_stale_run(plan_.state_dir)
    system = LocalSystem(plan_)
    up = False
    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if not up:
            raise _Stop

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    plan_.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        write_run_file(_run_file(system, plan_))
        try:
            system.start(args.ready_timeout)
        except PortBusy as e:
            print(f"infermesh up: {e}", file=sys.stderr)
            return 1
        except NotReady as e:
            print(f"infermesh up: {e}\n  logs: {plan_.logs_dir}", file=sys.stderr)
            return 1
        write_run_file(_run_file(system, plan_))
        up = True
        print("\n".join(summary(plan_)), flush=True)
        if args.exit_after_ready:
            return 0
        while not stopping:
            if system.check():
                write_run_file(_run_file(system, plan_))
            time.sleep(0.2)
        return 0
    except _Stop:
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        system.stop()
        system.remove_secrets()
        run_file_path(plan_.state_dir).unlink(missing_ok=True)
        print("infermesh stopped", flush=True)
