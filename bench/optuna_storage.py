"""Benchmark: which Optuna storage keeps a search's study safest, JournalStorage (a journal file) or SQLite?

Issue 12 asks for the study in the experiment folder, in "a JournalStorage file or SQLite, whichever survives a hard
kill and shared storage better". This measures both, as Optuna 5 opens them:
``JournalStorage(JournalFileBackend(path))`` (its default symlink lock) and ``RDBStorage("sqlite:///path")``.

1. Hard kill: a child process creates and finishes trials in a loop (ask, three intermediate values, tell; it prints
   each trial's number and value once ``tell`` returned) and is SIGKILLed at a random moment; ``--kills`` times per
   backend, on one growing study (as repeated crashes and ``--resume``). After each kill the study is reopened
   with ``optuna.load_study`` and checked: every trial reported finished is there, COMPLETE, with its value; how many
   trials were left RUNNING; whether the file is intact (journal: every line complete JSON; SQLite:
   ``PRAGMA integrity_check``); whether a lock was left behind; how long the next write took.
2. Concurrency, as on shared storage: ``--writers`` processes write trials into one study at once while a reader
   polls all trials every 0.2 s (as optuna-dashboard does); errors (e.g. "database is locked") and lost trials
   are counted.
3. Write throughput: one process writing ``--trials`` trials alone (trials/s), and the time to load the study.

    python bench/optuna_storage.py [--kills 20] [--writers 4] [--trials 40] [--workdir DIR]

The folder is on the local disk: this shows behaviour under a hard kill and under local concurrency, not NFS
semantics (see bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

STUDY = "bench"
BACKENDS = ("journal", "sqlite")
REPORTS_PER_TRIAL = 3


# -- storages ------------------------------------------------------------------------------------------------
def storage_file(folder: Path, backend: str) -> Path:
    return folder / ("optuna.journal" if backend == "journal" else "optuna.db")


def open_storage(backend: str, file: Path) -> Any:
    """The storage as tune_agb (journal) or a user (SQLite) would open it: Optuna's defaults."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    if backend == "journal":
        return JournalStorage(JournalFileBackend(str(file)))
    return RDBStorage(f"sqlite:///{file}")


def objective_value(x: float, y: float) -> float:
    return (x - 0.3) ** 2 + (y - 0.6) ** 2


def write_trials(backend: str, file: Path, n: int | None, writer: int, go: Path | None) -> None:
    """Child: finish ``n`` trials (None: until killed), starting once ``go`` exists (None: at once). Prints ``ok
    NUMBER VALUE`` once each ``tell`` returned, or ``err TEXT`` for a trial that raised (the loop goes on), then
    ``done SECONDS``."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=STUDY, storage=open_storage(backend, file))
    print("ready", flush=True)
    while go is not None and not go.exists():
        time.sleep(0.01)
    t0 = time.perf_counter()
    i = 0
    while n is None or i < n:
        i += 1
        try:
            trial = study.ask()
            x = trial.suggest_float("x", 0, 1)
            y = trial.suggest_float("y", 0, 1)
            trial.set_user_attr("writer", writer)
            value = objective_value(x, y)
            for step in range(REPORTS_PER_TRIAL):
                trial.report(value + 1 / (step + 1), step)
            study.tell(trial, value)
            print(f"ok {trial.number} {value!r}", flush=True)
        except Exception as exc:  # counted by the parent: this is what is measured
            print(f"err {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
    print(f"done {time.perf_counter() - t0:.3f}", flush=True)


def read_trials(backend: str, file: Path, stop: Path) -> None:
    """Child: poll every trial of the study every 0.2 s until ``stop`` exists, as optuna-dashboard does."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(backend, file)
    print("ready", flush=True)
    polls = 0
    while not stop.exists():
        try:
            study = optuna.load_study(study_name=STUDY, storage=storage)
            study.get_trials(deepcopy=False)
            polls += 1
        except Exception as exc:
            print(f"err {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
        time.sleep(0.2)
    print(f"done {polls}", flush=True)


def child(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--child", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(proc: subprocess.Popen[str]) -> None:
    """Read the child's ``ready`` line byte by byte: a buffered readline would keep (and communicate() then lose)
    whatever the child printed after it."""
    fd = proc.stdout.fileno() if proc.stdout else -1
    raw = b""
    while not raw.endswith(b"\n") and (c := os.read(fd, 1)):
        raw += c
    line = raw.decode()
    if line.strip() != "ready":
        out, err = proc.communicate()
        raise SystemExit(f"child did not start: {line}{out}\n{err[-2000:]}")


def parse(out: str) -> tuple[dict[int, float], list[str], float | None]:
    """``(finished trial number -> value, error lines, seconds)`` of a writer's output."""
    done, errors, seconds = {}, [], None
    for line in out.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "ok":
            number, value = rest.split()
            done[int(number)] = float(value)
        elif kind == "err":
            errors.append(rest)
        elif kind == "done":
            seconds = float(rest)
    return done, errors, seconds


# -- checks --------------------------------------------------------------------------------------------------
def file_intact(backend: str, file: Path) -> str:
    """``"ok"``, or what is wrong with the file itself."""
    if backend == "journal":
        bad = 0
        with open(file, "rb") as f:
            for line in f:
                try:
                    json.loads(line)
                    bad += not line.endswith(b"\n")
                except ValueError:
                    bad += 1
        return "ok" if bad == 0 else f"{bad} damaged lines"
    con = sqlite3.connect(file)
    try:
        result = con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()
    return "ok" if result == "ok" else result


def lock_left(backend: str, file: Path) -> bool:
    """A lock left by the killed process: the journal's symlink lock (SQLite's locks die with the process; a hot
    ``-journal`` is rolled back by the next opener and is not a lock)."""
    return backend == "journal" and os.path.lexists(f"{file}.lock")


def check_study(backend: str, file: Path, finished: dict[int, float]) -> dict[str, Any]:
    """Reopen the study with Optuna's API and check every trial reported finished."""
    import optuna
    from optuna.trial import TrialState

    t0 = time.perf_counter()
    try:
        study = optuna.load_study(study_name=STUDY, storage=open_storage(backend, file))
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    except Exception as exc:
        return {"reopened": False, "error": f"{type(exc).__name__}: {exc}"}
    load_s = time.perf_counter() - t0
    lost = sum(1 for n in finished if n not in trials)
    wrong = sum(
        1
        for n, v in finished.items()
        if n in trials and (trials[n].state != TrialState.COMPLETE or trials[n].value != v)
    )
    states = Counter(t.state.name for t in trials.values())
    return {"reopened": True, "study": study, "lost": lost, "wrong": wrong, "states": states, "load_s": load_s}


# -- the three measurements ----------------------------------------------------------------------------------
def new_study(backend: str, file: Path) -> None:
    import optuna

    optuna.create_study(study_name=STUDY, storage=open_storage(backend, file))


def hard_kills(backend: str, folder: Path, kills: int, rng: random.Random) -> dict[str, Any]:
    file = storage_file(folder, backend)
    new_study(backend, file)
    keys = ("finished", "errors", "lock left", "file damaged", "reopen failed", "lost", "wrong", "left running")
    agg: Counter[str] = Counter(dict.fromkeys((*keys, "other states"), 0))
    running_before = 0
    waits = []
    for _ in range(kills):
        proc = child([backend, str(file), "loop", "0"])
        wait_ready(proc)
        time.sleep(rng.uniform(0.05, 0.8))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        finished, errors, _ = parse(out)
        agg["finished"] += len(finished)
        agg["errors"] += len(errors)
        stale = lock_left(backend, file)
        agg["lock left"] += stale
        agg["file damaged"] += file_intact(backend, file) != "ok"
        res = check_study(backend, file, finished)
        if not res["reopened"]:
            agg["reopen failed"] += 1
            print(f"  {backend}: reopen failed: {res['error']}", file=sys.stderr)
            continue
        agg["lost"] += res["lost"]
        agg["wrong"] += res["wrong"]
        running = res["states"].get("RUNNING", 0)
        agg["left running"] += running - running_before
        running_before = running
        agg["other states"] += sum(c for s, c in res["states"].items() if s not in ("COMPLETE", "RUNNING"))
        if stale and agg["lock left"] > 1:
            os.unlink(f"{file}.lock")  # only the first stale lock is waited out (Optuna's 30 s grace period)
        t0 = time.perf_counter()
        study = res["study"]
        trial = study.ask()  # the next write, as a --resume would do
        study.tell(trial, objective_value(trial.suggest_float("x", 0, 1), 0.6))
        waits.append((time.perf_counter() - t0, stale))
    final = check_study(backend, file, {})
    return {
        "kills": kills,
        **agg,
        "trials": sum(final["states"].values()) if final["reopened"] else None,
        "load_s": final.get("load_s"),
        "first_write_s": max((w for w, _ in waits if not _), default=None),
        "stale_write_s": next((w for w, s in waits if s), None),
        "file": file_intact(backend, file),
    }


def concurrent(backend: str, folder: Path, writers: int, n: int, reader: bool) -> dict[str, Any]:
    file = storage_file(folder, backend)
    new_study(backend, file)
    stop, go = folder / "stop", folder / "go"
    procs = [child([backend, str(file), "write", str(n), str(w), str(go)]) for w in range(writers)]
    rproc = child([backend, str(file), "read", str(stop)]) if reader else None
    for p in procs + ([rproc] if rproc else []):
        wait_ready(p)
    go.touch()  # all writers start together
    t0 = time.perf_counter()
    outs = [p.communicate() for p in procs]
    wall = time.perf_counter() - t0
    stop.touch()
    rout = rproc.communicate() if rproc else ("", "")
    finished: dict[int, float] = {}
    errors: list[str] = []
    for out, _ in outs:
        done, errs, _ = parse(out)
        finished |= done
        errors += errs
    reader_errors = [line for line in rout[0].splitlines() if line.startswith("err")]
    polls = next((int(line.split()[1]) for line in rout[0].splitlines() if line.startswith("done")), 0)
    res = check_study(backend, file, finished)
    kinds = Counter(e.split(":")[0] + ": " + e.split(":", 1)[1].strip()[:60] for e in errors + reader_errors)
    return {
        "writers": writers,
        "asked": writers * n,
        "finished": len(finished),
        "errors": len(errors),
        "reader errors": len(reader_errors),
        "polls": polls,
        "error kinds": dict(kinds),
        "lost": res.get("lost"),
        "wrong": res.get("wrong"),
        "states": dict(res.get("states", {})),
        "trials_per_s": len(finished) / wall,
        "wall_s": wall,
        "load_s": res.get("load_s"),
        "file": file_intact(backend, file),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        backend, file, mode, *rest = sys.argv[2:]
        if mode == "read":
            read_trials(backend, Path(file), Path(rest[0]))
        else:
            n = int(rest[0]) or None
            go = Path(rest[2]) if len(rest) > 2 else None
            write_trials(backend, Path(file), n, int(rest[1]) if len(rest) > 1 else 0, go)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="hard kills per backend")
    ap.add_argument("--writers", type=int, default=4, help="processes writing one study at once")
    ap.add_argument("--trials", type=int, default=40, help="trials per concurrent writer (x4 for throughput)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="scratch folder (default: a new temp folder, removed after)")
    a = ap.parse_args()
    import shutil

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="tune_agb_optuna_storage_")).resolve()
    rng = random.Random(a.seed)
    print(f"# Optuna {optuna.__version__}, {platform.machine()}, {os.cpu_count()} cores, folder {work}\n")
    t_all = time.perf_counter()
    try:
        rows: dict[str, dict[str, Any]] = {}
        for backend in BACKENDS:
            folder = work / backend
            for sub in ("kill", "conc", "read", "alone"):
                (folder / sub).mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            rows[backend] = {
                "kill": hard_kills(backend, folder / "kill", a.kills, rng),
                "conc": concurrent(backend, folder / "conc", a.writers, a.trials, reader=True),
                "read": concurrent(backend, folder / "read", 1, a.trials * 2, reader=True),
                "alone": concurrent(backend, folder / "alone", 1, a.trials * 4, reader=False),
            }
            print(f"{backend}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        print("## hard kill\n")
        print("| backend | kills | trials reported finished | reopened | lost | wrong value/state | left RUNNING "
              "| other states | file intact | lock left | next write (s) | next write, stale lock (s) |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for b, r in rows.items():
            k = r["kill"]
            stale = "–" if k["stale_write_s"] is None else f"{k['stale_write_s']:.1f}"
            print(f"| {b} | {k['kills']} | {k['finished']} | {k['kills'] - k['reopen failed']} | {k['lost']} | "
                  f"{k['wrong']} | {k['left running']} | {k['other states']} | {k['kills'] - k['file damaged']}/"
                  f"{k['kills']} | {k['lock left']} | {k['first_write_s']:.3f} | {stale} |")  # fmt: skip
        print("\n## concurrency and throughput\n")
        print("| backend | case | trials asked | finished | writer errors | reader errors (polls) | lost | "
              "trials/s | load study (s) | error kinds |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|")
        cases = {
            "conc": f"{a.writers} writers + reader",
            "read": "1 writer + reader",
            "alone": "1 writer alone",
        }
        for b, r in rows.items():
            for key, label in cases.items():
                c = r[key]
                kinds = "; ".join(f"{k} x{v}" for k, v in c["error kinds"].items()) or "–"
                print(f"| {b} | {label} | {c['asked']} | {c['finished']} | {c['errors']} | "
                      f"{c['reader errors']} ({c['polls']}) | {c['lost']} | {c['trials_per_s']:.1f} | "
                      f"{c['load_s']:.3f} | {kinds} |")  # fmt: skip
        print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
