"""Runs of the training script: every model once per seed, one after the other in this process, or
in parallel processes of the standard library's ProcessPoolExecutor, with one progress view.

A run is one model with one seed. On a CPU the runs go one after the other in this process. On CUDA
(or on a CPU with --jobs N > 1) each run goes to a worker process, started with "spawn" (CUDA cannot
be forked), up to --jobs at a time (plan_jobs), placed on the least busy visible GPU, with one torch
thread on CUDA and an equal share of the cores on a CPU. The workers do not print: what they write
and their progress rows come back through a multiprocessing queue, and this process prints one line
when a run starts or ends and a status table every STATUS_EVERY seconds. A run that fails is
reported with its error, and the others carry on; Ctrl-C asks every running run to save after its
current step (--resume continues them), a second Ctrl-C stops them at once.

What one run does (train, evaluate) is handed over by the caller as `work`: this module never
imports the training script.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import multiprocessing
import os
import queue
import signal
import sys
import time
import traceback
import warnings

import torch

from report import duration, easiest, hardest, print_table


@dataclasses.dataclass(frozen=True)
class Run:
    """One model with one seed: a preset, or a variant of it (tag and overrides: a state size of the
    sweep, a knob of the frontier), at --lr or at a learning rate of its own."""
    preset: str
    seed: int
    tag: str = ""          # e.g. "_state2x16": part of the checkpoint's name
    overrides: tuple = ()  # Config fields that differ from model_config, as (field, value) pairs
    lr: float | None = None  # None: --lr; else this peak rate, named in the checkpoint (runs never collide)

    @property
    def suffix(self) -> str:
        """What the name adds to the preset: the tag, then the learning rate when the run has its own."""
        return self.tag + ("" if self.lr is None else f"_lr{self.lr:g}")

    @property
    def name(self) -> str:
        return self.preset + self.suffix

    @property
    def key(self) -> tuple[str, int]:
        return self.name, self.seed

    def __str__(self) -> str:
        return f"{self.name} seed {self.seed}"


def planned_runs(args) -> list[Run]:
    """Every run of this command, seed after seed (a run stopped part-way leaves whole seeds behind)."""
    runs = []
    for seed in args.seeds:
        runs += [Run(preset, seed) for preset in args.models]
        if args.sweep_state:
            runs += [Run("gdn", seed, f"_state{heads}x{dim}", (("gdn_heads", heads), ("gdn_head_dim", dim)))
                     for heads, dim in args.state_sizes]
    return runs


class Interrupted(SystemExit):
    """Training stopped on request after a saved step; exit status 130, as after Ctrl-C."""

    def __init__(self, step: int):
        super().__init__(130)
        self.step = step


class StopOnInterrupt:
    """Ctrl-C asks training to stop after the current step (so the checkpoint is exact and
    --resume continues to the same result); a second Ctrl-C stops at once."""

    def __enter__(self):
        self.requested = False
        self.previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: saving after this step (press again to stop at once)", flush=True)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)
        return False


class OneTorchThread:
    """Run the heuristics' token-by-token decoding on one torch thread: each step is a few dozen
    tiny ops, where more threads only wait for each other (10x slower on a busy 2-core machine)."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)
        return False


def finished_line(run: Run, result: dict, args) -> str:
    if "summary" in result:  # a --long run says its own (long_summary)
        return f"{run}: {result['summary']}"
    return (f"{run}: trained in {result['train_seconds']:.0f}s; recall easiest {easiest(result['eval'], args):.1%}, "
            f"hardest {hardest(result['eval'], args):.1%}; {result['convergence']['verdict']}"
            + ("" if result["learned"] else "; did not learn the task"))


def failure(run: Run, error: str, trace: str) -> dict:
    return {"model": run.name, "seed": run.seed, "error": error, "traceback": trace}


def error_line(e: BaseException, limit: int = 300) -> str:
    """The exception as one line: its type and its message, lines joined, cut at `limit` characters."""
    message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    message = message if len(message) <= limit else message[:limit - 3] + "..."
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def report_failures(failures: list[dict]) -> None:
    """The runs that failed, each with its traceback, on stderr."""
    for f in failures:
        sys.stderr.write(f"\n{f['model']} seed {f['seed']} failed:\n{f['traceback'] or f['error']}\n")
    sys.stderr.write(f"\n{len(failures)} run{'s' * (len(failures) > 1)} failed: "
                     + "; ".join(f"{f['model']} seed {f['seed']} ({f['error']})" for f in failures)
                     + ". The other runs' results are complete; --resume retries the failed ones.\n")


def use_triton_interpreter() -> None:
    """Switch Triton to its CPU interpreter. Triton reads TRITON_INTERPRET once, when it is first
    imported, and building an optimizer imports it (through torch._dynamo): so this runs first."""
    os.environ["TRITON_INTERPRET"] = "1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # kernels.py warns it is slow: the plan says how slow
        import kernels  # noqa: F401  (raises ImportError if Triton was imported before the switch)


def plan_jobs(args, device: torch.device, n_runs: int) -> tuple[int, list[str], int]:
    """(runs at a time, devices to spread them over, torch threads per run).

    Default on CUDA: every run in a process of its own, at most one per CPU core but one (left to
    this process and the driver), with one torch thread each. At this model size a training step is
    bound by the host, not the GPU: an H200 computes for microseconds of a ~34 ms step, the rest is
    Python, the autograd engine and kernel launches, one core's work. So the runs scale with the
    cores, whatever the GPUs, and a second torch thread finds no work to share (measured on one H200
    with 16 cores, EXPERIMENTS.md section 6: 12 runs of one thread at once took 274 s, 24 about
    300 s; 4 at a time with 4 threads each took 392 s for 15, and this default 237 s for the same
    15 runs of `--use-triton --seeds 0,1,2`). With --jobs N on CUDA: one thread each
    too. On a CPU the same by default: one run per core, one torch thread each, because a second
    thread barely speeds up a step this small (the default run of five models on 2 cores: 847 s one
    after the other with 2 threads, 702 s two at a time with one thread each). With --jobs N on a
    CPU: an equal share of the cores each (the thread count changes a run's last bits)."""
    cores = cpu_cores()
    if device.type == "cuda":
        gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if device.index is None else [str(device)]
        jobs = max(1, min(args.jobs or cores - 1, n_runs))
        return jobs, gpus, 1
    jobs = max(1, min(args.jobs or cores, n_runs))
    return jobs, [str(device)], max(1, cores // jobs)


def least_busy(devices: list[str], running_on: list[str]) -> str:
    """The device with the fewest running runs, the first of them on a tie: round robin while all
    runs last as long, and no GPU left idle when some finish early."""
    busy = collections.Counter(running_on)
    return min(devices, key=lambda device: busy[device])


def run_all(runs: list[Run], args, tokens, val_tokens, vocab_size, device, work) -> tuple[dict, list[dict]]:
    """Every run, here or in parallel processes (plan_jobs). Returns ({run.key: results}, failures);
    a Ctrl-C ends it with Interrupted after every running run has saved. work: what one run does,
    work(run, args, tokens, val_tokens, vocab_size, device, log=None, stop=None) -> its results
    (the training script's run_one; long_run.long_run_one for --long)."""
    jobs, devices, threads = plan_jobs(args, device, len(runs))
    if jobs == 1:
        return run_here(runs, args, tokens, val_tokens, vocab_size, device, work)
    print(f"{len(runs)} runs, {jobs} at a time as separate processes on {', '.join(devices)}, {threads} torch "
          f"thread{'s' if threads > 1 else ''} each; a status table every {STATUS_EVERY} s", flush=True)
    return Parallel(runs, args, (tokens, val_tokens, vocab_size), jobs, devices, threads, work).run()


def run_here(runs, args, tokens, val_tokens, vocab_size, device, work) -> tuple[dict, list[dict]]:
    """One run after the other in this process; a run that fails is reported and the others go on."""
    results, failures = {}, []
    for run in runs:
        try:
            results[run.key] = work(run, args, tokens, val_tokens, vocab_size, device)
        except Exception as e:  # one broken run (a foreign checkpoint, out of memory) must not lose the others
            failures.append(failure(run, error_line(e), traceback.format_exc()))
            print(f"FAILED {run}: {error_line(e)}", flush=True)
        else:
            print(finished_line(run, results[run.key], args), flush=True)
    return results, failures


# ---- in parallel: a ProcessPoolExecutor, and a queue for what the workers say ------------------

STATUS_EVERY = 60  # seconds between the status tables of a parallel run


@dataclasses.dataclass
class Running:
    """A run in a worker process, as this process sees it."""
    run: Run
    device: str
    started: float
    row: dict | None = None      # its latest progress row


class Parallel:
    """Runs in worker processes, at most `jobs` at a time, with one progress view (see this module's
    docstring).
    Runs are handed to the pool one at a time as workers free up, so that each goes to the least
    busy device and, after a Ctrl-C, the waiting ones never start."""

    def __init__(self, runs, args, data, jobs, devices, threads, work):
        self.waiting, self.args, self.data = collections.deque(runs), args, data
        self.jobs, self.devices, self.threads, self.work = jobs, devices, threads, work
        self.context = multiprocessing.get_context("spawn")
        self.stop, self.messages = self.context.Event(), self.context.Queue()
        self.running: dict[concurrent.futures.Future, Running] = {}
        self.results, self.failures, self.stopped = {}, [], []
        self.interrupts, self.t0 = 0, time.perf_counter()
        self.pool = self.new_pool()

    def new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(self.jobs, mp_context=self.context, initializer=start_worker,
                                                      initargs=(self.stop, self.messages, self.threads))

    def run(self) -> tuple[dict, list[dict]]:
        previous = signal.signal(signal.SIGINT, self.on_ctrl_c)
        try:
            last_status = time.perf_counter()
            while self.running or (self.waiting and not self.stop.is_set()):
                while self.waiting and len(self.running) < self.jobs and not self.stop.is_set():
                    self.start(self.waiting.popleft())
                done, _ = concurrent.futures.wait(self.running, timeout=1.0,
                                                  return_when=concurrent.futures.FIRST_COMPLETED)
                self.receive()
                for future in done:
                    self.finish(future)
                if time.perf_counter() - last_status >= STATUS_EVERY and self.running:
                    self.print_status()
                    last_status = time.perf_counter()
        except BaseException:  # this process itself failed: end the workers' runs with it
            for process in multiprocessing.active_children():
                process.kill()
            raise
        finally:
            signal.signal(signal.SIGINT, previous)
            self.pool.shutdown(cancel_futures=True)
            self.receive()                  # the workers' last lines, sent before they exited
        if self.stop.is_set():
            saved = ", ".join(f"{run} at step {step}" for run, step in self.stopped) or "none"
            print(f"\ninterrupted: runs saved: {saved}; the waiting runs did not start; continue with --resume",
                  flush=True)
            raise Interrupted(0)
        return self.results, self.failures

    def start(self, run: Run) -> None:
        device = least_busy(self.devices, [r.device for r in self.running.values()])
        task = (run_in_worker, run, self.args, *self.data, device, self.work)
        # A worker inherits an ignored SIGINT: a Ctrl-C in the terminal reaches every process of the
        # job, and only this one acts on it, asking the runs to save (through self.stop).
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            try:
                future = self.pool.submit(*task)
            except concurrent.futures.BrokenExecutor:  # a worker died: the runs still to come go to a new pool
                self.pool.shutdown(wait=False)
                self.pool = self.new_pool()
                future = self.pool.submit(*task)
        finally:
            signal.signal(signal.SIGINT, handler)
        self.running[future] = Running(run, device, time.perf_counter())
        print(f"started {run} on {device} ({len(self.running)} running, {len(self.waiting)} waiting)", flush=True)

    def receive(self) -> None:
        """Print the lines the workers wrote and keep each run's latest progress row."""
        rows = {r.run.key: r for r in self.running.values()}
        while True:
            try:
                kind, run, payload = self.messages.get_nowait()
            except queue.Empty:
                return
            if kind == "progress" and run.key in rows:
                rows[run.key].row = payload
            elif kind == "message":
                print(payload if str(run) in payload else f"[{run}] {payload}", flush=True)

    def finish(self, future: concurrent.futures.Future) -> None:
        """A run's worker has returned its last word: record it."""
        running = self.running.pop(future)
        run, minutes = running.run, (time.perf_counter() - running.started) / 60
        try:
            kind, payload = future.result()
        except Exception as e:  # its process died (killed, out of memory) before it could answer
            kind, payload = "failed", (f"its process ended before reporting a result ({error_line(e)})", "")
        if kind == "done":
            self.results[run.key] = payload
            print(f"finished {finished_line(run, payload, self.args)} ({minutes:.1f} min on {running.device})",
                  flush=True)
        elif kind == "stopped":
            self.stopped.append((run, payload))
        else:
            self.failures.append(failure(run, *payload))
            print(f"FAILED {run} on {running.device}: {payload[0]}", flush=True)

    def on_ctrl_c(self, signum, frame) -> None:
        self.interrupts += 1
        if self.interrupts == 1:
            self.stop.set()
            print("\nCtrl-C: every running run saves after its current step, and the waiting ones do not start "
                  "(press again to stop at once)", flush=True)
        else:
            for process in multiprocessing.active_children():
                process.kill()

    def print_status(self) -> None:
        print_status(time.perf_counter() - self.t0, list(self.running.values()), len(self.results),
                     len(self.waiting), len(self.failures))


def print_status(elapsed: float, running: list[Running], finished: int, waiting: int, failed: int) -> None:
    """The status table of a parallel run: one row per running run, its latest progress row."""
    print(f"--- after {elapsed / 60:.1f} min: {len(running)} running, {finished} finished, {waiting} waiting, "
          f"{failed} failed")
    rows = []
    for r in running:
        if r.row is None:
            rows.append([str(r.run), r.device, "starting", "", "", "", ""])
            continue
        rows.append([str(r.run), r.device, f"{r.row['step']}/{r.row['steps']}", f"{r.row['loss']:.3f}",
                     f"{r.row['recall']:.1%}", "-" if r.row["probe"] is None else f"{r.row['probe']:.1%}",
                     duration(r.row["eta"])])
    print_table(["run", "device", "step", "loss", "recall", "held-out", "ETA"], rows)
    sys.stdout.flush()


# ---- in a worker process -------------------------------------------------------------------------

WORKER = {}  # what start_worker hands to every run of this worker process: the stop event, the queue


class LinesToQueue(io.TextIOBase):
    """A worker's stdout and stderr: each complete line goes into the queue, for the parent to print."""

    def __init__(self, messages):
        self.messages, self.partial, self.run = messages, "", None

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            if line.strip():
                self.messages.put(("message", self.run, line))
        return len(text)


class StopEvent:
    """train_model's stop request in a worker: the parent sets the event on Ctrl-C."""

    def __init__(self, event):
        self.event = event

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @property
    def requested(self) -> bool:
        return self.event.is_set()


def start_worker(stop, messages, threads: int) -> None:
    """A worker process starts: Ctrl-C is the parent's (it sets `stop`), and what it prints goes to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdout = sys.stderr = LinesToQueue(messages)
    torch.set_num_threads(threads)
    WORKER.update(stop=stop, messages=messages)


def run_in_worker(run: Run, args, tokens, val_tokens, vocab_size, device: str, work) -> tuple:
    """One run in a worker process (`work`: what a run does); returns its last word: ("done", results),
    ("failed", (error, traceback)) or ("stopped", step). Its progress rows go to the parent as they come."""
    sys.stdout.run = run
    messages = WORKER["messages"]
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        elif args.use_triton:
            use_triton_interpreter()
        result = work(run, args, tokens, val_tokens, vocab_size, torch.device(device),
                      log=lambda row: messages.put(("progress", run, row)), stop=StopEvent(WORKER["stop"]))
    except Interrupted as e:
        return "stopped", e.step
    except BaseException as e:  # reported to the parent, which carries on with the other runs
        return "failed", (error_line(e), traceback.format_exc())
    return "done", result
