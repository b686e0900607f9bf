"""Executors run toy tasks (tests/executor_toys.py): same bytes whatever runs them, each task once,
lost workers retried, application errors recorded and not retried, re-runs resume."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fillup_data.errors import FillupError
from fillup_data.executors import LocalExecutor, RankExecutor, TaskSpec, execute, rank_from_env, read_status
from fillup_data.executors.claims import ClaimStore, live_claims
from fillup_data.executors.devices import usable_cpus
from tests.executor_toys import ToyFactory, toy_phases

REPO = Path(__file__).resolve().parents[1]
PHASES = toy_phases()
ALL_IDS = [t.id for phase in PHASES for t in phase]


def outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "data").glob("*.bin"))}


def run_counts(out: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in (out / "runs.log").read_text().splitlines():
        task_id = line.split()[0]
        counts[task_id] = counts.get(task_id, 0) + 1
    return counts


def is_done_in(out: Path):
    return lambda task_id: (out / "done" / task_id.replace("/", "+")).exists()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes]:
    """The toy build run in-process: what every executor must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("reference")
    report = execute(PHASES, ToyFactory.for_phases(out, PHASES), out / "state", LocalExecutor(devices=["cpu"]))
    assert report.ok and report.tasks_run == len(ALL_IDS)
    assert len(outputs(out)) == len(ALL_IDS)
    return outputs(out)


# --- local -------------------------------------------------------------------------------------------

def test_local_two_worker_processes_give_the_in_process_bytes(tmp_path, reference):
    report = execute(PHASES, ToyFactory.for_phases(tmp_path, PHASES), tmp_path / "state",
                     LocalExecutor(devices=["cpu", "cpu"]))
    assert report.ok and report.tasks_run == len(ALL_IDS) and not report.retries
    assert outputs(tmp_path) == reference
    assert run_counts(tmp_path) == {task_id: 1 for task_id in ALL_IDS}
    started = [json.loads(p.read_text()) for p in (tmp_path / "started").iterdir()]
    assert os.getpid() not in {s["pid"] for s in started}  # ran in worker processes, not here
    assert {s["threads"] for s in started} == {max(1, usable_cpus() // 2)}  # the cores split between them


def test_local_rerun_skips_done_tasks(tmp_path):
    factory = ToyFactory.for_phases(tmp_path, PHASES)
    execute(PHASES, factory, tmp_path / "state", LocalExecutor(devices=["cpu"]))
    again = execute(PHASES, factory, tmp_path / "state", LocalExecutor(devices=["cpu"]))
    assert again.tasks_run == 0 and again.tasks_skipped == len(ALL_IDS)
    driver_side = execute(PHASES, factory, tmp_path / "state", LocalExecutor(devices=["cpu"]),
                          is_done=is_done_in(tmp_path))
    assert driver_side.tasks_skipped == len(ALL_IDS)
    assert run_counts(tmp_path) == {task_id: 1 for task_id in ALL_IDS}


def test_local_sigkilled_worker_process_is_replaced_and_its_task_retried(tmp_path, reference):
    victim = "synthetic/train-synthetic-00001"
    factory = ToyFactory.for_phases(tmp_path, PHASES, kill_once=(victim,))
    report = execute(PHASES, factory, tmp_path / "state", LocalExecutor(devices=["cpu", "cpu"]))
    assert report.ok, report.format()
    assert [task for task, _ in report.retries] == [victim]
    assert "exit code -9" in report.retries[0][1]
    assert outputs(tmp_path) == reference
    assert run_counts(tmp_path)[victim] == 2


def test_local_application_error_stops_after_its_phase_and_a_rerun_completes(tmp_path, reference):
    bad = "invert/g0001"
    state = tmp_path / "state"
    failing = ToyFactory.for_phases(tmp_path, PHASES, fail=(bad,))
    report = execute(PHASES, failing, state, LocalExecutor(devices=["cpu"]))
    assert not report.ok and report.stopped_after_phase == 0
    [(task, text)] = report.failures
    assert task == bad and "Traceback" in text and "ValueError: toy failure in invert/g0001" in text
    assert report.tasks_run == len(PHASES[0]) - 1  # the rest of the phase finished
    assert not list((tmp_path / "data").glob("synthetic+*"))  # the next phase did not start
    record = json.loads((state / "failed" / "invert+g0001.json").read_text())
    assert record["task"] == bad and "toy failure" in record["error"] and "Traceback" in record["traceback"]
    status = read_status(state, PHASES, is_done_in(tmp_path))
    assert [(s.done, s.total) for s in status] == [(len(PHASES[0]) - 1, len(PHASES[0])), (0, 4), (0, 1)]
    assert [f["task"] for f in status[0].failed] == [bad]

    again = execute(PHASES, ToyFactory.for_phases(tmp_path, PHASES), state, LocalExecutor(devices=["cpu"]))
    assert again.ok and again.tasks_run == 1 + len(PHASES[1]) + 1
    assert not (state / "failed" / "invert+g0001.json").exists()
    assert outputs(tmp_path) == reference
    assert all(s.complete and not s.failed for s in read_status(state, PHASES, is_done_in(tmp_path)))


def test_local_worker_whose_runner_cannot_be_created_fails_its_tasks_with_the_reason(tmp_path):
    phases = [[TaskSpec("real/a"), TaskSpec("real/b")]]
    report = execute(phases, BrokenFactory(), tmp_path / "state", LocalExecutor(devices=["cpu", "cpu"]))
    assert sorted(task for task, _ in report.failures) == ["real/a", "real/b"]
    assert all("could not create its runner" in text and "no model here" in text for _, text in report.failures)


class BrokenFactory:
    def __call__(self, worker):
        raise OSError("no model here")


def test_local_default_worker_count_follows_the_visible_gpus(monkeypatch):
    import fillup_data.executors.local as local

    monkeypatch.setattr(local, "visible_cuda_devices", lambda: 0)
    assert LocalExecutor().devices == ["cpu"] and LocalExecutor().in_process
    monkeypatch.setattr(local, "visible_cuda_devices", lambda: 2)
    assert LocalExecutor().devices == ["cuda:0", "cuda:1"]
    assert [i.device for i in LocalExecutor().infos] == ["cuda:0", "cuda:0"]  # each pinned: sees one GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert local._cuda_visible_devices_for("cuda:1") == "6"
    assert local._cuda_visible_devices_for("cpu") == ""


def test_task_ids_that_cannot_be_file_names_are_refused():
    for bad in ["", "a b", "../x", "/abs", "a//b", "a+b"]:
        with pytest.raises(ValueError, match="task id"):
            TaskSpec(bad)
    with pytest.raises(ValueError, match="twice"):
        execute([[TaskSpec("a")], [TaskSpec("a")]], ToyFactory("x", ()), Path("/nonexistent-unused"), LocalExecutor())


# --- ranks -------------------------------------------------------------------------------------------

def test_rank_from_env_reads_slurm_arrays_then_torchrun():
    slurm = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert rank_from_env(slurm) == (2, 3)
    assert rank_from_env({**slurm, "SLURM_ARRAY_TASK_ID": "14", "SLURM_ARRAY_TASK_STEP": "2"}) == (2, 3)
    assert rank_from_env({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4"}) == (0, 4)
    assert rank_from_env({**slurm, "RANK": "1", "WORLD_SIZE": "8"}) == (2, 3)  # the array wins
    assert rank_from_env({"RANK": "1", "WORLD_SIZE": "8"}) == (1, 8)
    assert rank_from_env({}) is None
    with pytest.raises(FillupError, match="SLURM_ARRAY_TASK_ID=13 does not map"):
        rank_from_env({**slurm, "SLURM_ARRAY_TASK_ID": "13"})
    with pytest.raises(FillupError, match="RANK='x' is not an integer"):
        rank_from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(FillupError, match="RANK=8 is not below WORLD_SIZE=8"):
        rank_from_env({"RANK": "8", "WORLD_SIZE": "8"})


def test_a_stale_claim_is_taken_over_by_exactly_one_rank(tmp_path):
    owner = ClaimStore(tmp_path, rank=0, lease_seconds=60)
    held, stale = owner.try_claim("real/x")
    assert held is not None and stale is None
    assert ClaimStore(tmp_path, rank=1, lease_seconds=60).try_claim("real/x") == (None, None)  # live: keep off
    claim = json.loads(owner.path("real/x").read_text())
    owner.path("real/x").write_text(json.dumps({**claim, "expires": time.time() - 1}))  # its rank stopped renewing
    takers = [ClaimStore(tmp_path, rank=r, lease_seconds=60) for r in (1, 2)]
    results = [store.try_claim("real/x") for store in takers]
    winners = [r for r in results if r[0] is not None]
    assert len(winners) == 1 and winners[0][1]["owner"]["rank"] == 0
    assert not owner.renew(held)  # the old owner learns it lost the claim
    owner.release(held)  # and cannot remove the new owner's claim
    assert set(live_claims(tmp_path)) == {"real/x"}


def test_a_taker_that_saw_the_stale_claim_late_does_not_replace_the_new_owner(tmp_path, monkeypatch):
    owner = ClaimStore(tmp_path, rank=0, lease_seconds=60)
    owner.try_claim("real/x")
    claim = json.loads(owner.path("real/x").read_text())
    stale = {**claim, "expires": time.time() - 1}
    owner.path("real/x").write_text(json.dumps(stale))
    first, late = ClaimStore(tmp_path, rank=1, lease_seconds=60), ClaimStore(tmp_path, rank=2, lease_seconds=60)
    held, _ = first.try_claim("real/x")
    assert held is not None
    # The late taker read the claim while it was still stale, then lost the CPU until after the takeover.
    reads = iter([stale])
    real_read = ClaimStore.read
    monkeypatch.setattr(late, "read", lambda task_id: next(reads, None) or real_read(late, task_id))
    assert late.try_claim("real/x") == (None, None)
    assert first.renew(held)  # still the owner


def test_a_claim_file_cut_short_by_a_crash_expires_one_lease_after_its_mtime(tmp_path):
    store = ClaimStore(tmp_path, rank=0, lease_seconds=60)
    store.path("real/x").write_text("")
    assert store.try_claim("real/x") == (None, None)
    old = time.time() - 120
    os.utime(store.path("real/x"), (old, old))
    held, stale = store.try_claim("real/x")
    assert held is not None and stale["owner"]["nonce"].startswith("unreadable-")


STARTED_RANKS: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_rank_left_behind():
    """A failing rank test must not leave its rank processes running."""
    yield
    while STARTED_RANKS:
        process = STARTED_RANKS.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


def start_rank(out: Path, rank: int, world: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "tests.executor_toys", str(out), str(rank), str(world), *extra],
                               cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    STARTED_RANKS.append(process)
    return process


def finish(process: subprocess.Popen) -> int:
    _, err = process.communicate(timeout=60)
    assert process.returncode in (0, -signal.SIGKILL), err
    return process.returncode


def rank_reports(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "reports").glob("*.json"))]


def test_three_ranks_at_once_give_the_same_bytes_each_task_once(tmp_path, reference):
    ranks = [start_rank(tmp_path, r, 3) for r in range(3)]
    assert [finish(p) for p in ranks] == [0, 0, 0]
    assert outputs(tmp_path) == reference
    assert run_counts(tmp_path) == {task_id: 1 for task_id in ALL_IDS}
    reports = rank_reports(tmp_path)
    assert sum(r["tasks_run"] for r in reports) == len(ALL_IDS) and not any(r["failures"] for r in reports)
    assert not list((tmp_path / "state" / "claims").glob("*.json"))  # finished tasks leave no claim


def test_ranks_started_at_different_times_give_the_same_bytes(tmp_path, reference):
    late_starters = []
    first = start_rank(tmp_path, 2, 3, "--sleep", "0.3")
    deadline = time.monotonic() + 30
    while not list((tmp_path / "done").glob("*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    late_starters.append(start_rank(tmp_path, 0, 3, "--sleep", "0.3"))
    time.sleep(0.5)
    late_starters.append(start_rank(tmp_path, 1, 3, "--sleep", "0.3"))
    assert [finish(p) for p in [first, *late_starters]] == [0, 0, 0]
    assert outputs(tmp_path) == reference
    assert run_counts(tmp_path) == {task_id: 1 for task_id in ALL_IDS}


def test_a_rank_that_never_starts_does_not_block_the_others(tmp_path, reference):
    # world size 2, rank 1 never runs: rank 0 takes its unclaimed share of every phase
    assert finish(start_rank(tmp_path, 0, 2)) == 0
    assert outputs(tmp_path) == reference
    [report] = rank_reports(tmp_path)
    assert report["tasks_run"] == len(ALL_IDS) and not report["retries"]


def test_a_rank_killed_mid_task_is_taken_over_and_rerunning_it_finds_everything_done(tmp_path, reference):
    victim = "synthetic/train-synthetic-00001"  # rank 1's share (index 1 of 3 ranks)
    ranks = [start_rank(tmp_path, r, 3, "--lease", "2", "--kill-once", victim) for r in range(3)]
    codes = [finish(p) for p in ranks]
    assert codes.count(-signal.SIGKILL) == 1 and codes.count(0) == 2
    assert outputs(tmp_path) == reference
    takeovers = [retry for report in rank_reports(tmp_path) for retry in report["retries"]]
    assert [task for task, _ in takeovers] == [victim] and "expired" in takeovers[0][1]
    assert run_counts(tmp_path)[victim] == 2
    killed_rank = codes.index(-signal.SIGKILL)
    assert finish(start_rank(tmp_path, killed_rank, 3, "--lease", "2")) == 0  # the re-run: nothing left to do
    assert outputs(tmp_path) == reference and run_counts(tmp_path)[victim] == 2


def test_rank_application_error_is_not_retried_by_running_ranks_but_by_a_rerun(tmp_path, reference):
    bad = "real/train-real-00001"
    state = tmp_path / "state"
    factory = ToyFactory.for_phases(tmp_path, PHASES, fail=(bad,))
    ranks = [RankExecutor(r, 2, lease_seconds=5, poll_seconds=0.05, device="cpu") for r in range(2)]
    reports = [None, None]
    threads = [threading.Thread(target=lambda r=r: reports.__setitem__(r, execute(PHASES, factory, state, ranks[r])))
               for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(r.stopped_after_phase == 0 and [t for t, _ in r.failures] == [bad] for r in reports)
    assert all("ValueError: toy failure" in r.failures[0][1] for r in reports)
    assert run_counts(tmp_path)[bad] == 1
    status = read_status(state, PHASES, is_done_in(tmp_path))
    assert [f["task"] for f in status[0].failed] == [bad] and not status[0].running

    rerun = execute(PHASES, ToyFactory.for_phases(tmp_path, PHASES), state,
                    RankExecutor(0, 2, lease_seconds=5, poll_seconds=0.05, device="cpu"))
    assert rerun.ok and outputs(tmp_path) == reference


def test_status_lists_a_running_task_from_its_live_claim(tmp_path):
    store = ClaimStore(tmp_path / "state", rank=3, lease_seconds=60)
    store.try_claim("invert/g0000")
    status = read_status(tmp_path / "state", PHASES, lambda task_id: task_id.startswith("real/"))
    assert (status[0].done, status[0].total) == (3, 5)
    assert [(c["task"], c["owner"]["rank"]) for c in status[0].running] == [("invert/g0000", 3)]


# --- ray ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the module, on the loopback address only: 2 CPUs and 2 logical GPUs."""
    # Ray replaces 127.0.0.1 by the machine's outward address unless multi-node support for
    # "Windows or OSX" is off; read when ray is imported, and inherited by the raylet and its workers.
    saved = {k: os.environ.get(k) for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_memory_monitor_refresh_ms",
                                            "PYTHONPATH")}
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"  # a shared CI box near its memory limit: no OOM kills
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), saved["PYTHONPATH"] or ""])  # actors import the toys
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install fillup-data[ray])")
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    assert not ray_constants.ENABLE_RAY_CLUSTER, "ray was imported before this fixture: it would not stay on loopback"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        # a removed node is declared dead within ~1 s instead of ~30 s
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 300,
                           "health_check_failure_threshold": 3}})
    try:
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def ray_executor(**options):
    from fillup_data.executors import RayExecutor

    return RayExecutor(worker_device="cpu", **options)  # the cluster's GPUs are logical


def test_ray_gives_the_local_bytes_each_task_once(ray_cluster, tmp_path, reference):
    executor = ray_executor()
    assert executor._pools[True].capacity == 2 and executor._pools[True].options == {"num_gpus": 1.0, "num_cpus": 0}
    report = execute(PHASES, ToyFactory.for_phases(tmp_path, PHASES), tmp_path / "state", executor)
    assert report.ok and report.tasks_run == len(ALL_IDS) and not report.retries
    assert outputs(tmp_path) == reference
    assert run_counts(tmp_path) == {task_id: 1 for task_id in ALL_IDS}
    model_runs = [json.loads((tmp_path / "started" / t.id.replace("/", "+")).read_text()) for t in PHASES[1]]
    assert len({r["pid"] for r in model_runs}) <= 2  # long-lived actors: one runner each for all their tasks
    assert {(r["device"], r["threads"]) for r in model_runs} == {("cpu", 1)}  # 2 cores shared by 2 GPU actors


def test_ray_cluster_without_gpus_runs_model_tasks_on_cpu_actors_and_says_so(ray_cluster, tmp_path, reference,
                                                                                monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    executor = ray_executor()
    assert executor._pools[True] is executor._pools[False]
    report = execute(PHASES, ToyFactory.for_phases(tmp_path, PHASES), tmp_path / "state", executor)
    assert report.ok and outputs(tmp_path) == reference
    assert any("no GPUs" in note for note in report.notes)


def test_ray_missing_gives_the_install_command(monkeypatch):
    from fillup_data.executors import RayExecutor

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(FillupError, match=r"pip install fillup-data\[ray\]"):
        RayExecutor()


def test_ray_actor_sigkilled_mid_task_is_replaced_and_the_task_retried(ray_cluster, tmp_path, reference):
    victim = "synthetic/train-synthetic-00002"
    factory = ToyFactory.for_phases(tmp_path, PHASES, kill_once=(victim,))
    report = execute(PHASES, factory, tmp_path / "state", ray_executor())
    assert report.ok, report.format()
    assert [task for task, _ in report.retries] == [victim]
    assert "ActorDiedError" in report.retries[0][1]
    assert outputs(tmp_path) == reference
    assert run_counts(tmp_path)[victim] == 2


def test_ray_application_error_is_recorded_with_its_traceback_and_not_retried(ray_cluster, tmp_path):
    bad = "invert/g0000"
    state = tmp_path / "state"
    report = execute(PHASES, ToyFactory.for_phases(tmp_path, PHASES, fail=(bad,)), state, ray_executor())
    assert report.stopped_after_phase == 0 and not report.retries
    [(task, text)] = report.failures
    assert task == bad and "Traceback" in text and "ValueError: toy failure in invert/g0000" in text
    assert run_counts(tmp_path)[bad] == 1
    assert "toy failure" in json.loads((state / "failed" / "invert+g0000.json").read_text())["error"]


def test_ray_node_removed_mid_run_its_task_is_retried_elsewhere(ray_cluster, tmp_path, reference):
    node = ray_cluster.add_node(num_cpus=1, num_gpus=1, node_ip_address="127.0.0.1")
    factory = ToyFactory.for_phases(tmp_path, PHASES, sleep_model_tasks=1.0)
    executor = ray_executor()
    assert executor._pools[True].capacity == 3  # the third model actor can only live on the new node

    caught: list[str] = []

    def remove_node_when_it_runs_a_model_task():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for started in (tmp_path / "started").glob("*"):
                is_model_task = started.name.startswith(("invert+", "synthetic+"))
                if not is_model_task or (tmp_path / "done" / started.name).exists():
                    continue
                try:
                    on_node = json.loads(started.read_text())["node"] == node.node_id
                except (json.JSONDecodeError, FileNotFoundError):
                    continue
                if on_node:  # the task sleeps 1 s: it is mid-task
                    caught.append(started.name.replace("+", "/"))
                    ray_cluster.remove_node(node, allow_graceful=False)
                    return
            time.sleep(0.02)

    remover = threading.Thread(target=remove_node_when_it_runs_a_model_task)
    remover.start()
    try:
        report = execute(PHASES, factory, tmp_path / "state", executor)
    finally:
        remover.join()
    assert caught, "the test never saw a model task on the extra node"
    assert report.ok, report.format()
    assert caught[0] in [task for task, _ in report.retries]
    assert outputs(tmp_path) == reference


def test_an_executor_serves_one_factory(tmp_path):
    """Workers keep the runner their factory made: a second factory must not be run by them."""
    first, second = ToyFactory.for_phases(tmp_path / "a", PHASES), ToyFactory.for_phases(tmp_path / "b", PHASES)
    executor = LocalExecutor()
    executor.bind(first)
    executor.bind(ToyFactory.for_phases(tmp_path / "a", PHASES))  # an equal factory is the same one
    with pytest.raises(ValueError, match="already runs tasks"):
        execute(PHASES, second, tmp_path / "state", executor)


# --- the real build on each executor -------------------------------------------------------------------
# A small Textual Inversion build of the demo source on the tiny pipeline: every file under data/ and
# tokens/ must not depend on which executor, or how many workers, made it. On CPU, torch's thread count
# decides the last bits of a float sum, so the reference is built with the threads each worker gets.

def _local_build(tmp_path_factory, threads: int, *overrides: str) -> Path:
    import torch

    from fillup_data.build import run_build
    from tests.test_synthesis import QUIET, mini

    out = tmp_path_factory.mktemp(f"local-ti-{threads}") / "out"
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_build(mini(*overrides), out, **QUIET)
    finally:
        torch.set_num_threads(saved)
    return out


@pytest.fixture(scope="module")
def local_ti_build_1_thread(tmp_path_factory):
    return _local_build(tmp_path_factory, 1)


@pytest.fixture(scope="module")
def local_ti_build_2_threads(tmp_path_factory):
    return _local_build(tmp_path_factory, 2)


def tree_bytes(out: Path) -> dict[str, bytes]:
    files = {str(p.relative_to(out)): p.read_bytes() for sub in ("data", "tokens")
             for p in sorted((out / sub).rglob("*")) if p.is_file()}
    assert any(k.startswith("tokens/diffusers/") for k in files) and any(k.startswith("data/train-synthetic") for k in files)
    return files


@pytest.mark.slow
def test_build_on_ray_gives_the_local_bytes(ray_cluster, local_ti_build_1_thread, tmp_path):
    from fillup_data.build import run_build
    from tests.test_synthesis import QUIET, mini

    out = tmp_path / "out"
    executor = ray_executor()  # 2 logical GPUs on 2 cores: two model actors of one thread each
    summary = run_build(mini(), out, executor=executor, **QUIET)
    assert summary.shards_written == summary.shards and summary.tokens_trained == 9
    assert tree_bytes(out) == tree_bytes(local_ti_build_1_thread)
    assert (out / "index.parquet").read_bytes() == (local_ti_build_1_thread / "index.parquet").read_bytes()


def _rank_build(out: Path, rank: int, *extra: str) -> subprocess.Popen:
    from tests.test_synthesis import DEMO, MINI

    args = [a for kv in MINI for a in ("--set", kv)]
    return subprocess.Popen([sys.executable, "-m", "fillup_data.cli", "build", str(DEMO), "--out", str(out),
                             "--quiet", "--workers", "1", "--rank", str(rank), "--world-size", "3",
                             "--poll-seconds", "0.2", *extra, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def _assert_rank_build_matches(out: Path, local: Path) -> None:
    assert tree_bytes(out) == tree_bytes(local)  # each rank: 2 threads (the cores / local ranks)
    assert (out / "index.parquet").read_bytes() == (local / "index.parquet").read_bytes()
    assert (json.loads((out / "manifest.json").read_text())["shards"]
            == json.loads((local / "manifest.json").read_text())["shards"])


@pytest.mark.slow
def test_build_as_three_ranks_gives_the_local_bytes(local_ti_build_2_threads, tmp_path):
    out = tmp_path / "out"
    procs = [_rank_build(out, r, "--lease-seconds", "60") for r in range(3)]
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        assert p.returncode == 0, stderr[-3000:]
        assert "build finished" in stdout
    _assert_rank_build_matches(out, local_ti_build_2_threads)


@pytest.mark.slow
def test_rank_killed_mid_shard_then_ranks_started_later_finish_identical(local_ti_build_2_threads, tmp_path):
    """Rank 0 starts alone and does the others' share too; it is SIGKILLed while it streams a synthetic
    shard. Ranks 1 and 2 start later, rank 0 is re-run: the dead rank's claim (its pid is gone on this
    host) is taken over at once, though its lease has 10 minutes left."""
    out = tmp_path / "out"
    first = _rank_build(out, 0, "--lease-seconds", "600")
    killed: list = []
    _sigkill_writer_of("train-synthetic-*.tmp", out / "data", 600, killed)
    first.communicate(timeout=60)
    assert killed and killed[0][0] == first.pid and first.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    later = [_rank_build(out, r, "--lease-seconds", "600") for r in (1, 2)]
    time.sleep(1.0)
    later.append(_rank_build(out, 0, "--lease-seconds", "600"))
    outputs = []
    for p in later:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
        outputs.append(stdout)
    assert sum("task retried after its worker was lost: synthetic/train-synthetic-" in o for o in outputs) == 1
    assert not list((out / "data").glob("*.tmp"))  # the dead rank's temp: its pid is gone on this host
    _assert_rank_build_matches(out, local_ti_build_2_threads)


def _sigkill_writer_of(pattern: str, folder: Path, deadline_s: float, killed: list) -> None:
    """Watch ``folder`` for a shard being made (its empty ``.tmp``: a synthetic shard is written once its
    images exist) and SIGKILL the process making it, found by its open file descriptor: what the OOM
    killer or a node failure does to a worker."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and not killed:
        for tmp in folder.glob(pattern):
            for fd_dir in Path("/proc").glob("[0-9]*/fd"):
                try:
                    holds = any(os.readlink(fd) == str(tmp) for fd in fd_dir.iterdir())
                    generating = tmp.stat().st_size == 0  # images still being made: the shard cannot finish
                except OSError:
                    continue
                if holds and generating:
                    pid = int(fd_dir.parent.name)
                    os.kill(pid, signal.SIGKILL)
                    killed.append((pid, tmp.name))
                    return
        time.sleep(0.02)


@pytest.mark.slow
def test_ray_actor_sigkilled_mid_synthetic_shard_build_completes_identical(ray_cluster, local_ti_build_1_thread,
                                                                            tmp_path):
    from fillup_data.build import run_build
    from tests.test_synthesis import QUIET, mini

    out = tmp_path / "out"
    killed: list = []
    watcher = threading.Thread(target=_sigkill_writer_of, daemon=True,
                               args=("train-synthetic-*.tmp", out / "data", 600, killed))
    watcher.start()
    summary = run_build(mini(), out, executor=ray_executor(), **QUIET)
    watcher.join(timeout=5)
    assert killed and killed[0][0] != os.getpid(), "no actor was caught writing a synthetic shard"
    retried = summary.extra["task_retries"]
    assert len(retried) == 1 and retried[0][0].startswith("synthetic/"), retried
    assert "task retried after its worker was lost: synthetic/" in summary.format()
    assert not list((out / "data").glob("*.tmp"))
    assert tree_bytes(out) == tree_bytes(local_ti_build_1_thread)


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


@pytest.mark.slow
def test_ray_node_removed_mid_synthetic_shard_build_completes_identical(ray_cluster, local_ti_build_1_thread,
                                                                         tmp_path):
    import ray

    from fillup_data.build import run_build
    from tests.test_synthesis import QUIET, mini

    @ray.remote(num_gpus=1, num_cpus=0)
    class HoldsAGpu:
        def ping(self) -> int:
            return 1

    # the head's two GPUs are taken, so the build's one model actor can only live on the new node
    holders = [HoldsAGpu.remote() for _ in range(2)]
    ray.get([h.ping.remote() for h in holders])
    node = ray_cluster.add_node(num_cpus=1, num_gpus=1, node_ip_address="127.0.0.1")
    raylet = node.all_processes["raylet"][0].process.pid
    out = tmp_path / "out"
    removed: list = []

    def remove_the_node_while_it_generates_a_shard():
        end = time.monotonic() + 600
        while time.monotonic() < end and not removed:
            for tmp in (out / "data").glob("train-synthetic-*.tmp"):
                for fd_dir in Path("/proc").glob("[0-9]*/fd"):
                    try:
                        holds = any(os.readlink(fd) == str(tmp) for fd in fd_dir.iterdir())
                        # an empty temp: the shard's images are still being generated, nothing is written yet
                        generating = tmp.stat().st_size == 0
                    except OSError:
                        continue
                    if holds and generating and _descends_from(int(fd_dir.parent.name), raylet):
                        # a lost machine takes its workers with it: removing the node stops its raylet,
                        # but a worker already running a task would finish it and answer the driver
                        workers = [int(p.name) for p in Path("/proc").glob("[0-9]*")
                                   if int(p.name) != raylet and _descends_from(int(p.name), raylet)]
                        ray_cluster.remove_node(node, allow_graceful=False)
                        for pid in workers:
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(pid, signal.SIGKILL)
                        removed.append(tmp.name)
                        for h in holders:  # the head's GPUs come free for the replacement actor
                            ray.kill(h)
                        return
            time.sleep(0.02)

    remover = threading.Thread(target=remove_the_node_while_it_generates_a_shard, daemon=True)
    remover.start()
    try:
        summary = run_build(mini(), out, executor=ray_executor(num_workers=1), **QUIET)
    finally:
        remover.join(timeout=5)
        for h in holders:
            ray.kill(h)
    assert removed, "the model actor on the new node was never seen generating a synthetic shard"
    task = "synthetic/" + removed[0].split(".", 1)[0]
    assert task in [t for t, _ in summary.extra["task_retries"]], summary.extra["task_retries"]
    assert not list((out / "data").glob("*.tmp"))
    assert tree_bytes(out) == tree_bytes(local_ti_build_1_thread)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_claim_of_a_process_gone_from_this_host_is_taken_over_at_once(tmp_path):
    import socket

    store = ClaimStore(tmp_path, rank=1, lease_seconds=3600)
    path = store.path("synthetic/train-synthetic-00000")
    path.parent.mkdir(parents=True, exist_ok=True)
    far = time.time() + 3600
    for owner, taken in ([{"host": socket.gethostname(), "pid": os.getpid(), "rank": 0, "nonce": "alive"}, False],
                         [{"host": "another-host", "pid": _dead_pid(), "rank": 0, "nonce": "elsewhere"}, False],
                         [{"host": socket.gethostname(), "pid": _dead_pid(), "rank": 0, "nonce": "dead"}, True]):
        path.write_text(json.dumps({"task": "synthetic/train-synthetic-00000", "owner": owner, "expires": far}))
        held, stale = store.try_claim("synthetic/train-synthetic-00000")
        assert (held is not None) == taken, owner
        assert (stale is not None and stale["owner"]["nonce"] == "dead") == taken


def test_partial_shards_of_lost_writers_are_removed_and_live_ones_kept(tmp_path):
    import socket

    from fillup_data.shards.writer import remove_stale_temps
    from fillup_data.state import temp_writer, unique_temp_path

    here = socket.gethostname()
    mine = unique_temp_path(tmp_path / "train-synthetic-00000.tar")
    assert temp_writer(mine.name) == (here, os.getpid())
    dead = tmp_path / f"train-synthetic-00001.tar.{_dead_pid()}-0a1b2c3d@{here}.tmp"
    remote = tmp_path / f"train-synthetic-00002.tar.{_dead_pid()}-0a1b2c3d@another-host.tmp"
    old_format = tmp_path / "train-synthetic-00003.tar.1234-0a1b2c3d.tmp"
    for p in (mine, dead, remote, old_format):
        p.write_bytes(b"partial")
    # rank builds: only what cannot be written any more goes (a lost writer of this host, or idle for a lease)
    assert remove_stale_temps(tmp_path, idle_seconds=3600) == [dead.name]
    old = time.time() - 7200
    os.utime(remote, (old, old))
    assert remove_stale_temps(tmp_path, idle_seconds=3600) == [remote.name]
    # a driver build that holds the lock, every task done: every temp left is a lost worker's
    assert remove_stale_temps(tmp_path) == sorted([mine.name, old_format.name])


@pytest.mark.slow
def test_ray_driver_killed_mid_build_then_rerun_completes_identical(ray_cluster, local_ti_build_1_thread, tmp_path):
    """The driver (a real CLI process) is SIGKILLed while an actor generates a synthetic shard; Ray ends
    its actors with it. Re-running the same command resumes from the records."""
    from tests.test_synthesis import DEMO, MINI

    out = tmp_path / "out"
    command = [sys.executable, "-m", "fillup_data.cli", "build", str(DEMO), "--out", str(out), "--quiet",
               "--workers", "1", "--executor", "ray", "--ray-address", ray_cluster.address,
               *[a for kv in MINI for a in ("--set", kv)]]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen: list = []
    end = time.monotonic() + 600
    while time.monotonic() < end and not seen and driver.poll() is None:
        seen = [p for p in (out / "data").glob("train-synthetic-*.tmp") if p.stat().st_size == 0]
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    driver.communicate(timeout=60)
    assert seen and driver.returncode == -signal.SIGKILL, "the driver finished before it could be killed"
    assert not (out / "manifest.json").exists()
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    import re

    written, reused = map(int, re.search(r"\((\d+) written, (\d+) reused from an earlier run", again.stdout).groups())
    assert reused >= 7 and written >= 1  # the real shards (and any synthetic shard) done before the kill stay
    assert not list((out / "data").glob("*.tmp"))
    assert tree_bytes(out) == tree_bytes(local_ti_build_1_thread)


@pytest.mark.slow
def test_build_on_two_local_worker_processes_gives_the_local_bytes(local_ti_build_1_thread, tmp_path):
    """The path a machine with two GPUs takes (one spawned worker per device), here on two CPU 'devices'."""
    from fillup_data.build import run_build
    from tests.test_synthesis import QUIET, mini

    executor = LocalExecutor(devices=["cpu", "cpu"])
    assert [info.num_threads for info in executor.infos] == [max(1, usable_cpus() // 2)] * 2
    out = tmp_path / "out"
    summary = run_build(mini(), out, executor=executor, **QUIET)
    assert summary.shards_written == summary.shards and summary.tokens_trained == 9
    if usable_cpus() == 2:  # each worker then has the reference's one thread
        assert tree_bytes(out) == tree_bytes(local_ti_build_1_thread)
