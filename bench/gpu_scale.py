"""Issue 30: a search end to end at scale on one GPU host, with a kill and a ``--resume``, measured from outside.

    python bench/synthetic_store.py --out DIR --train 20000 --val 1000 --tile 244 [--workers 16]
    python bench/gpu_scale.py search --data DIR --out OUT --gpus-per-trial 0.25 --max-concurrent 4 \\
        --num-samples 8 --max-t 3 --kill-after 150 [--cpus-per-trial 3] [--budget-s 420]

**store** (``python bench/gpu_scale.py store ...`` runs ``bench/synthetic_store.py`` with the same arguments; its
docstring says what it writes): a synthetic dataset of 14-band tiles written directly in ``tune_agb.store``'s packed
format, and ``DIR/gpu_scale_store.json``, the manifest ``search`` reads.

**search** writes a search space (ASHA, grace period 1, 244-px U-Nets of depth 4, ``base_channels`` and
``batch_size`` searched among ``--base-channels`` / ``--batch-sizes``, lr searched, ``wsd`` schedule) and runs
``python -m tune_agb.search`` on the store in its own process group; once ``--kill-after`` seconds have passed and
at least one epoch is reported it SIGKILLs the whole group, then runs the same command with ``--resume`` to the end.
Every ``--sample-every`` seconds it records ``nvidia-smi``'s utilisation and memory (when ``nvidia-smi`` exists) and
the ``RssAnon`` of the search driver and of every ``ray::`` process. At the end it writes ``OUT/summary.json``:

- ``gpu``: utilisation (mean, per phase, per 10-s bin) and memory;
- ``rss``: per trial and process (found by the ``pid`` column of the results; a resumed trial has two), RssAnon at
  the first sample of the process's time on the trial, at its first report, at its last, and the max; ``growth_mb``
  = the max after the first report - at the first report (start-up, imports and the CUDA context come before the
  first report and are not growth);
- ``epochs``: epochs per trial, seconds per epoch (between consecutive reports of one process; a process's first
  epoch holds its start-up and is left out), each trial's peak GPU memory (``gpu_mem_peak_gb``), and the compute
  bound per epoch: forward + backward FLOPs per sample (``FlopCounterMode``) x samples per epoch + the val
  forward pass, over ``--peak-tflops`` (989: H200 dense bf16), for the whole card and for the trial's share;
- ``resume``: whether the kill happened (and when), the exit codes, each trial's status, whether every trial
  finished, and the trials that reported both before and after the kill (``continued_across_kill``: their last
  epoch before it and first after it);
- ``best``: the best val RMSE (trial, epoch, configuration) and each trial's first and best val RMSE.

Files in ``OUT``: ``space.yaml``, ``search_first.log``, ``search_resume.log``, ``gpu_timeline.csv``,
``rss_timeline.csv``, ``gpu_scale.log`` (each step), ``summary.json``, and the experiment under ``OUT/ray/scale``.
``--budget-s``: the waits end in time for a summary (the search is interrupted with SIGINT, then killed). Every step
logs its failure and the summary is still written. The figures are computed in ``bench/scale_summary.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import synthetic_store  # noqa: E402  (same folder: the store subcommand)
from scale_summary import (  # noqa: E402  (same folder: the figures)
    best_summary,
    continued_trials,
    epoch_summary,
    gpu_summary,
    print_summary,
    rss_per_trial,
    trial_statuses,
)
from synthetic_store import MANIFEST  # noqa: E402

from tune_agb.store import _check_and_open, list_tiles, split_key  # noqa: E402


def log(out: Path | None, msg: str) -> None:
    """One line to stdout and to ``OUT/gpu_scale.log``."""
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    if out is not None:
        with (out / "gpu_scale.log").open("a") as f:
            f.write(line + "\n")


# -- search: the run, the kill, the resume, the sampling --------------------------------------------------------------
def rss_anon_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def cmdline(pid: int | str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class Sampler:
    """Every ``every`` seconds: nvidia-smi's utilisation and memory per GPU, and the RssAnon of the search driver and
    of every ``ray::`` process, to two CSV files and to memory (for the summary)."""

    def __init__(self, out: Path, every: float):
        self.every, self.t0 = every, time.time()
        self.smi = shutil.which("nvidia-smi")
        self.phase, self.driver = "setup", 0
        self.gpu: list[tuple[float, str, int, float, float]] = []  # t, phase, gpu, util %, memory MiB
        self.rss: list[tuple[float, str, int, float, str]] = []  # wall time, phase, pid, RssAnon MB, title
        self.gpu_f = (out / "gpu_timeline.csv").open("w")
        self.gpu_f.write("t_s,phase,gpu,util_pct,mem_used_mib\n")
        self.rss_f = (out / "rss_timeline.csv").open("w")
        self.rss_f.write("t_s,wall_time,phase,pid,rss_anon_mb,title\n")
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.sample()
            except Exception as exc:  # a sampling hiccup must not end the benchmark
                if len(self.errors) < 20:
                    self.errors.append(f"{type(exc).__name__}: {exc}")

    def sample(self) -> None:
        now = time.time()
        rel = now - self.t0
        if self.smi:
            q = [self.smi, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
            try:
                lines = subprocess.run(q, capture_output=True, text=True, timeout=5).stdout.strip().splitlines()
            except (OSError, subprocess.SubprocessError) as exc:
                lines = []
                if len(self.errors) < 20:
                    self.errors.append(f"nvidia-smi: {exc}")
            for i, line in enumerate(lines):
                try:
                    util, mem = (float(v) for v in line.split(","))
                except ValueError:
                    continue
                self.gpu.append((rel, self.phase, i, util, mem))
                self.gpu_f.write(f"{rel:.1f},{self.phase},{i},{util:g},{mem:g}\n")
            self.gpu_f.flush()
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            pid = int(d)
            title = cmdline(pid)
            if pid != self.driver and not title.startswith("ray::"):
                continue
            rss = rss_anon_mb(pid)
            if rss is None:
                continue
            title = "driver" if pid == self.driver else title[:80].replace(",", ";")
            self.rss.append((now, self.phase, pid, rss, title))
            self.rss_f.write(f"{rel:.1f},{now:.2f},{self.phase},{pid},{rss:.1f},{title}\n")
        self.rss_f.flush()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.gpu_f.close()
        self.rss_f.close()


class SearchProcess:
    """``python -m tune_agb.search`` in its own process group, with its own short Ray temp dir."""

    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str], tag: str):
        self.ray_tmp = f"/tmp/gsc{os.getpid()}{tag}"  # short: Ray's socket paths are limited to 107 bytes
        self.log_path = log_path
        self.started = time.time()
        with log_path.open("w") as f:
            self.proc = subprocess.Popen(
                cmd,
                stdout=f,
                stderr=subprocess.STDOUT,
                env={**env, "RAY_TMPDIR": self.ray_tmp},
                cwd=REPO,
                start_new_session=True,
            )

    def kill(self) -> None:
        """SIGKILL the whole process group (the driver and the Ray processes it started), then the stragglers."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=60)
        self.cleanup()

    def interrupt(self, grace_s: float) -> None:
        """Ctrl-C for the driver (it saves Ray's state and writes the results), then a kill after ``grace_s``."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace_s)
        self.kill()

    def cleanup(self) -> list[int]:
        """Kill what is left of this search's Ray: its process group, and processes naming its temp dir."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        left = []
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) != os.getpid() and self.ray_tmp in cmdline(d):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(d), signal.SIGKILL)
                    left.append(int(d))
        return left

    def keep_logs(self, dest: Path, max_bytes: int = 2_000_000) -> None:
        """Copy Ray's session logs (files up to ``max_bytes``) to ``dest``: what a failed run leaves to read."""
        logs = Path(self.ray_tmp) / "session_latest" / "logs"
        for f in logs.rglob("*") if logs.is_dir() else []:
            with contextlib.suppress(OSError):
                if f.is_file() and f.stat().st_size <= max_bytes:
                    target = dest / f.relative_to(logs)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, target)

    def remove_tmp(self) -> None:
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    def wait(self, deadline: float, kill_when: Callable[[float], bool] = lambda _: False) -> str:
        """Poll every second until the search exits (``"exited"``), ``kill_when(seconds since its start)`` is true
        (``"kill"``) or ``time.monotonic()`` passes ``deadline`` (``"budget"``); the caller kills or interrupts."""
        while self.proc.poll() is None:
            if kill_when(time.time() - self.started):
                return "kill"
            if time.monotonic() > deadline:
                return "budget"
            time.sleep(1.0)
        return "exited"

    def finish(self, logs_to: Path, ok: tuple[int, ...]) -> tuple[int | None, list[int]]:
        """The exit code and the stragglers killed; Ray's logs copied to ``logs_to`` unless the code is in ``ok``;
        the temp dir removed."""
        rc = self.proc.poll()
        left = self.cleanup()
        if rc not in ok:
            self.keep_logs(logs_to)
        self.remove_tmp()
        return rc, left


def write_space(path: Path, a: argparse.Namespace) -> dict[str, Any]:
    import yaml

    space = {
        "experiment": {
            "metric": "val_rmse",
            "mode": "min",
            "num_samples": a.num_samples,
            "max_concurrent": a.max_concurrent,
            "time_budget_s": None,
            "max_failures": 1,
        },
        "scheduler": {
            "type": "asha",
            "max_t": a.max_t,
            "grace_period": 1,
            "reduction_factor": a.reduction_factor,
            "brackets": 1,
        },
        "searcher": {"type": "optuna", "seed": a.seed, "n_startup_trials": max(1, a.num_samples // 2)},
        "resources": {"cpu": a.cpus_per_trial, "gpu": a.gpus_per_trial},
        "fixed": {
            "depth": a.depth,
            "schedule": "wsd",
            "norm": "batch",
            "amp": "auto",
            "augment": True,
            "steps_per_epoch": a.steps_per_epoch,
        },
        "params": {
            "lr": {"type": "float", "low": 3.0e-4, "high": 3.0e-3, "log": True},
            "base_channels": {"type": "categorical", "choices": a.base_channels},
            "batch_size": {"type": "categorical", "choices": a.batch_sizes},
        },
    }
    path.write_text(
        "# bench/gpu_scale.py search: written for this run (issue 30)\n" + yaml.safe_dump(space, sort_keys=False)
    )
    return space


def epochs_reported(exp: Path) -> int:
    from tune_agb.search.experiment import read_trial_rows

    return sum(1 for r in read_trial_rows(str(exp)) if "epoch" in r)


def search(a: argparse.Namespace) -> int:
    t0 = time.monotonic()
    deadline = t0 + a.budget_s
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_scale.log").unlink(missing_ok=True)
    summary: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}}
    errors: list[str] = []
    summary["errors"] = errors
    exp = out / "ray" / "scale"

    def step_failed(name: str, exc: BaseException) -> None:
        errors.append(f"{name}: {type(exc).__name__}: {exc}")
        log(out, f"step {name} failed: {type(exc).__name__}: {exc}")

    def write_summary() -> None:
        summary["wall_s"] = round(time.monotonic() - t0, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))

    try:
        manifest = json.loads((a.data.resolve() / MANIFEST).read_text())
        for s, v in manifest["splits"].items():
            _check_and_open(Path(v["path"]), v["key"], s)
            key = split_key(list_tiles(manifest["input_dir"], manifest["label_dir"], s), "float16")
            if key != v["key"]:
                raise ValueError(f"split {s}: the placeholders' key is {key}, the store's {v['key']} (files touched?)")
    except Exception as exc:
        step_failed("open the store", exc)
        log(out, f"no usable store at {a.data} (write it with `python bench/synthetic_store.py --out {a.data}`)")
        write_summary()
        return 2
    summary["data"] = {k: manifest[k] for k in ("store_root", "tile", "gb_float16_store", "gb_float32_equivalent")}
    summary["data"] |= {"train_tiles": manifest["splits"]["train"]["n"], "val_tiles": manifest["splits"]["val"]["n"]}
    space_path = out / "space.yaml"
    write_space(space_path, a)
    if exp.exists():
        shutil.rmtree(exp)
    cmd = [
        sys.executable, "-m", "tune_agb.search", "--space", str(space_path),
        "--input-dir", manifest["input_dir"], "--label-dir", manifest["label_dir"],
        "--storage", str(out / "ray"), "--name", "scale",
        "--gpus-per-trial", f"{a.gpus_per_trial:g}", "--cpus-per-trial", f"{a.cpus_per_trial:g}",
    ]  # fmt: skip
    summary["command"] = " ".join(cmd)
    env = {
        **os.environ,
        "TUNE_AGB_STORE": manifest["store_root"],
        "TUNE_AGB_STORE_DTYPE": "float16",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    env.pop("RAY_ADDRESS", None)
    resume: dict[str, Any] = {"killed": False}
    summary["resume"] = resume

    with Sampler(out, a.sample_every) as sampler:
        # 1. the search, killed with SIGKILL once --kill-after has passed and an epoch is reported
        first = None
        try:
            log(out, f"search: {' '.join(cmd)}")
            sampler.phase = "first"
            first = SearchProcess(cmd, out / "search_first.log", env, "a")
            sampler.driver = first.proc.pid
            ended = first.wait(deadline - 60, lambda s: s >= a.kill_after and epochs_reported(exp) > 0)
            if ended == "kill":
                elapsed = time.time() - first.started
                resume.update(killed=True, kill_at_s=round(elapsed, 1), reports_before_kill=epochs_reported(exp))
                resume["kill_wall_time"] = time.time()
                log(out, f"SIGKILL to the search's process group after {elapsed:.0f} s")
                first.kill()
            elif ended == "budget":
                log(out, "budget: interrupting the first run before its kill point")
                first.interrupt(30)
                resume["budget_exhausted"] = "first run"
            ok = (0, 130, -signal.SIGKILL)
            resume["first_rc"], resume["stragglers_killed"] = first.finish(out / "ray_logs_first", ok)
            log(out, f"first run ended: exit {resume['first_rc']}, {epochs_reported(exp)} reports on disk")
        except Exception as exc:
            step_failed("first run", exc)
            if first is not None:
                first.kill()

        # 2. the same command with --resume, to the end (or to the budget)
        second = None
        if "budget_exhausted" not in resume:
            try:
                sampler.phase = "resume"
                log(out, "resume: the same command with --resume")
                second = SearchProcess([*cmd, "--resume"], out / "search_resume.log", env, "b")
                sampler.driver = second.proc.pid
                if second.wait(deadline - 45) == "budget":
                    log(out, "budget: interrupting the resumed search (SIGINT, then SIGKILL after 30 s)")
                    second.interrupt(30)
                    resume["budget_exhausted"] = "resume"
                secs = round(time.time() - second.started, 1)
                rc, left = second.finish(out / "ray_logs_resume", (0, 130))
                resume.update(resume_rc=rc, resume_s=secs, stragglers_killed_resume=left)
                log(out, f"resume ended: exit {resume['resume_rc']} after {resume['resume_s']:.0f} s")
            except Exception as exc:
                step_failed("resume", exc)
                if second is not None:
                    second.kill()
        sampler.phase = "done"
    if sampler.errors:
        summary["sampler_errors"] = sampler.errors

    # 3. the figures
    df = None
    try:
        from tune_agb.engine.config import read_yaml_or_json
        from tune_agb.search.experiment import read_trial_rows
        from tune_agb.search.results import results_frame
        from tune_agb.search.space import parse_search_space

        space = parse_search_space(read_yaml_or_json(space_path, "search-space file"), source=str(space_path))
        df = results_frame(read_trial_rows(str(exp)), space)
        summary["best"] = best_summary(df, space)
    except Exception as exc:
        step_failed("read the results", exc)
    for name, fn in (
        ("gpu", lambda: gpu_summary(sampler)),
        ("rss", lambda: rss_per_trial(sampler, df)),
        ("epochs", lambda: epoch_summary(df, a, manifest)),
    ):
        try:
            if df is None and name != "gpu":
                raise RuntimeError("no results to read")
            summary[name] = fn()
        except Exception as exc:
            step_failed(name, exc)
    try:
        statuses = trial_statuses(exp)
        resume["statuses"] = statuses
        trials = df["trial_id"].nunique() if df is not None else 0
        resume["trials_reported"] = int(trials)
        resume["num_samples"] = a.num_samples
        done = (
            all(v == "TERMINATED" for v in statuses.values()) and len(statuses) == a.num_samples
            if isinstance(statuses, dict)
            else trials == a.num_samples
        )
        resume["all_trials_finished"] = bool(resume.get("resume_rc") == 0 and done)
        resume["continued_across_kill"] = continued_trials(df, resume.get("kill_wall_time"))
    except Exception as exc:
        step_failed("trial statuses", exc)
    write_summary()
    print_summary(summary, out)
    return 0 if resume.get("all_trials_finished") and not errors else 1


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["store"]:  # bench/synthetic_store.py, with the same arguments
        return synthetic_store.main(argv[1:], prog="gpu_scale.py store")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("store", help="write the synthetic placeholders + store (bench/synthetic_store.py; see its --help)")
    se = sub.add_parser("search", help="the search with a kill and --resume, sampled")
    se.add_argument("--data", type=Path, required=True, help="the folder `store --out` wrote")
    se.add_argument("--out", type=Path, required=True)
    se.add_argument("--gpus-per-trial", type=float, default=0.25)
    se.add_argument("--cpus-per-trial", type=float, default=3)
    se.add_argument("--max-concurrent", type=int, default=4)
    se.add_argument("--num-samples", type=int, default=8)
    se.add_argument("--max-t", type=int, default=3)
    se.add_argument("--reduction-factor", type=int, default=3)
    se.add_argument("--kill-after", type=float, default=150, help="s after the start; waits for a reported epoch")
    se.add_argument("--budget-s", type=float, default=600, help="the waits end in time for a summary")
    se.add_argument("--base-channels", type=_ints, default=[16, 32], help="choices, e.g. 16,32")
    se.add_argument("--batch-sizes", type=_ints, default=[16, 32], help="choices, e.g. 16,32")
    se.add_argument("--depth", type=int, default=4)
    se.add_argument("--steps-per-epoch", type=int, default=0, help="0: one pass over the train tiles")
    se.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense bf16 peak (H200: 989)")
    se.add_argument("--sample-every", type=float, default=1.0, help="seconds between samples")
    se.add_argument("--seed", type=int, default=0)
    return search(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
