"""Several cooperating processes of one JAX run (SPEC S146, S147).

`python -m jax_impl.cli train CONFIG --out DIR --processes P` starts P local processes (a
thin launcher, `launch`), each running the same command line with JAX's coordinator
environment set and `runtime.mesh.data x runtime.mesh.components / P` simulated CPU devices
of its own. Every process calls `jax.distributed.initialize` (`join`, before JAX starts a
backend) with the gloo CPU collectives, then builds the same global mesh; process 0 is the
primary (run directory, metrics, logs).

On several hosts, set on every host (and start one process per host, or several with
distinct ids):

    JAX_COORDINATOR_ADDRESS=host0:port   the coordinator (process 0's host), JAX's own variable
    JAX_NUM_PROCESSES=P                   how many processes the run has
    JAX_PROCESS_ID=i                      this process, 0 .. P-1

and run `python -m jax_impl.cli train CONFIG --out DIR` (a shared file system for DIR). Set
all three or none: a half-set environment, an id out of range, `--processes` other than
JAX_NUM_PROCESSES or a mesh whose devices P does not divide are refused with one line naming
them. No wait is unbounded: joining times out after `JOIN_TIMEOUT` s, a process that stops
answering is declared dead by the coordinator after `HEARTBEAT_TIMEOUT` s; locally the
launcher stops every process as soon as one fails and names it."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from contract.config import ConfigError
from contract.errors import EXIT_INPUT
from contract.resolve import ResolvedRun

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
JOIN_TIMEOUT = int(os.environ.get("VPD_JAX_JOIN_TIMEOUT", "60"))  # s to find every process at the start
HEARTBEAT_TIMEOUT = 30  # s without a heartbeat before the coordinator declares a process dead
SHUTDOWN_TIMEOUT = 300  # s the processes wait for each other at exit (a slow process 0 is not a dead one)
STOP_GRACE = 10.0  # s between SIGTERM and SIGKILL when the launcher stops the other processes


def process_env(environ=None) -> tuple[str, int, int] | None:
    """(coordinator, processes, this process) from the environment; None when none is set.
    ConfigError naming the missing or malformed variables otherwise."""
    env = os.environ if environ is None else environ
    have = {k: env[k] for k in ENV if env.get(k)}
    if not have:
        return None
    missing = [k for k in ENV if k not in have]
    if missing:
        raise ConfigError(f"multi-process environment half set: {', '.join(f'{k}={v}' for k, v in have.items())} "
                          f"but {', '.join(missing)} unset; set all of {', '.join(ENV)} or none")
    try:
        n, i = int(have["JAX_NUM_PROCESSES"]), int(have["JAX_PROCESS_ID"])
    except ValueError:
        raise ConfigError(f"JAX_NUM_PROCESSES={have['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID="
                          f"{have['JAX_PROCESS_ID']!r} must be integers") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"JAX_PROCESS_ID={i} is not a process of JAX_NUM_PROCESSES={n} (ids 0 .. {n - 1})")
    if not re.fullmatch(r"[^:\s]+:\d+", have["JAX_COORDINATOR_ADDRESS"]):
        raise ConfigError(f"JAX_COORDINATOR_ADDRESS={have['JAX_COORDINATOR_ADDRESS']!r} is not host:port")
    return have["JAX_COORDINATOR_ADDRESS"], n, i


def check(run: ResolvedRun, processes: int | None) -> tuple[str, int, int] | None:
    """The process environment of this run, checked against `--processes` and the mesh."""
    env = process_env()
    m = run.cfg.runtime.mesh
    n_dev = m.data * m.components
    p = env[1] if env is not None else processes
    if env is not None and processes is not None and processes != env[1]:
        raise ConfigError(f"--processes {processes} but JAX_NUM_PROCESSES={env[1]}; give the same count (or leave "
                          "--processes out under a launcher that sets the environment)")
    if p is not None and n_dev % p:
        raise ConfigError(f"runtime.mesh: data {m.data} x components {m.components} = {n_dev} devices cannot be split "
                          f"evenly over {p} processes")
    return env


def needs_launch(run: ResolvedRun, processes: int | None) -> bool:
    """Whether this command must start the run's processes (--processes P > 1, outside a
    launcher)."""
    return check(run, processes) is None and processes is not None and processes > 1


def join(run: ResolvedRun) -> None:
    """Join the run's processes when the environment names them (nothing otherwise). Before
    JAX starts a backend: the CPU collectives, the local device count and remat's scheduler
    (S144, before XLA reads its flags) are set here."""
    from jax_impl.remat import use_memory_scheduler
    use_memory_scheduler(run.cfg.runtime.remat)  # a no-op when remat is off
    env = check(run, None)
    if env is None:
        return
    import jax
    if jax.distributed.is_initialized():  # a process builds several backends (tools, tests): joined once
        return
    addr, n, i = env
    m = run.cfg.runtime.mesh
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if "JAX_NUM_CPU_DEVICES" not in os.environ and "xla_force_host_platform_device_count" not in os.environ.get(
            "XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", m.data * m.components // n)
    why = (f"process {i} of {n} could not join the run at JAX_COORDINATOR_ADDRESS={addr} within {JOIN_TIMEOUT} s; "
           f"start all {n} processes with the same coordinator")
    # JAX's coordination client aborts the process (SIGABRT, a C++ fatal log) when the join
    # times out; this watchdog ends it first with the run's one-line error and exit code
    done = threading.Event()

    def watchdog():
        if not done.wait(JOIN_TIMEOUT):
            print(f"vpd-train: error: {why}", file=sys.stderr, flush=True)
            os._exit(EXIT_INPUT)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        jax.distributed.initialize(addr, n, i, initialization_timeout=JOIN_TIMEOUT + 30,
                                   heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT,
                                   shutdown_timeout_seconds=SHUTDOWN_TIMEOUT)
    except Exception as e:  # noqa: BLE001 - the coordination service raises XlaRuntimeError / RuntimeError
        raise ConfigError(f"{why} ({' '.join(str(e).split())[:200]})") from None
    finally:
        done.set()
    have = jax.device_count()
    if have != m.data * m.components:
        raise ConfigError(f"runtime.mesh: data {m.data} x components {m.components} = {m.data * m.components} "
                          f"devices, but the {n} processes hold {have} ({jax.local_device_count()} in process {i}); "
                          "give every process mesh devices / processes local devices")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(n_dev: int, processes: int, i: int, addr: str) -> dict[str, str]:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    env.update({"JAX_COORDINATOR_ADDRESS": addr, "JAX_NUM_PROCESSES": str(processes), "JAX_PROCESS_ID": str(i),
                "JAX_NUM_CPU_DEVICES": str(n_dev // processes), "JAX_PLATFORMS": env.get("JAX_PLATFORMS", "cpu")})
    return env


def launch(run: ResolvedRun, processes: int, argv: list[str], prog: str) -> int:
    """Run `python -m jax_impl.cli *argv` as `processes` local processes; the run's exit code.
    When a process fails, the others are stopped (SIGTERM, then SIGKILL after STOP_GRACE s)
    and the first one that failed is named."""
    m = run.cfg.runtime.mesh
    n_dev = m.data * m.components
    addr = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, "-m", "jax_impl.cli", *argv], env=child_env(n_dev, processes, i, addr))
             for i in range(processes)]
    forwarded: list[int] = []

    def forward(signum, frame):  # a signal to the launcher reaches every process (each saves at the same step)
        forwarded.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    failed: tuple[int, int] | None = None
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                time.sleep(0.5)  # the peers of a dead process abort within moments: see them all
                failed = first_failure([p.poll() for p in procs])
                _stop([p for p in procs if p.poll() is None])
                break
            time.sleep(0.1)
        for p in procs:
            p.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if failed is None:
        failed = first_failure([p.returncode for p in procs])
    if failed is None:
        return 0
    i, code = failed
    if forwarded and code == 128 + forwarded[0]:
        return code  # stopped by the signal it was sent (a checkpoint was saved)
    how = f"exit code {code}" if code > 0 else f"killed by signal {-code}"
    print(f"{prog}: error: process {i} of {processes} failed ({how}); the run stopped in every process "
          "(its error is above; rerun the same command to resume from the last checkpoint)", file=sys.stderr)
    return code if code > 0 else 128 - code


def first_failure(codes: list[int | None]) -> tuple[int, int] | None:
    """(process, exit code) of the process that failed first among exit codes (None = still
    running): one that exited with an error or was killed before one that JAX aborted
    (SIGABRT: its coordination client ends a process whose peer died), lowest index first."""
    bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
    if not bad:
        return None
    return min(bad, key=lambda ic: (ic[1] == -signal.SIGABRT, ic[0]))


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    deadline = time.monotonic() + STOP_GRACE
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
