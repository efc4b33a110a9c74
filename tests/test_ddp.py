"""torchrun smoke run of the harness: DDP + SyncBatchNorm on 2 gloo processes equals one process."""

import datetime
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bnrepro import runtime

REPO = Path(__file__).resolve().parents[1]

# Stated tolerance: with the same global batch, seed and data order, every evaluated test
# accuracy of the 2-process run is within 0.2 percentage points of the 1-process run's, and
# the monitored percentiles within 0.05 (float sums in another order are the only difference).
ACC_TOL = 0.002
PCT_TOL = 0.05


def test_torchrun_two_processes_match_single_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    # 120 steps, compared at 6 evaluations: SyncBN without the synchronization (local
    # statistics), without the backward's all_sum, or DDP without the gradient average each
    # put some evaluation of the first 60 steps outside the tolerances (the correct run
    # agreed to every digit); 300 steps cost 2.5 times as long to find nothing more.
    common = ["figure1", "--steps", "120", "--eval-every", "20", "--seeds", "1", "--quiet"]
    # The single-process run goes alongside the two ranks: its start-up overlaps theirs.
    # One torch thread, as torchrun gives each rank: three busy processes share the cores,
    # and torch's default of a thread per core spins at every parallel region.
    single = subprocess.Popen([sys.executable, "-m", "bnrepro", *common, "--workers", "1",
                               "--out", str(tmp_path / "one")], env=dict(env, OMP_NUM_THREADS="1"),
                              stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                              "--standalone", "-m", "bnrepro", *common,
                              "--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=240)
        _, single_err = single.communicate(timeout=240)
    finally:
        if single.poll() is None:
            single.kill()
            single.wait()
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("bnrepro figure1: writing to") == 1  # only rank 0 prints
    assert single.returncode == 0, single_err[-3000:]
    a = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    b = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert a["provenance"]["processes"] == 2 and b["provenance"]["processes"] == 1
    for ra, rb in zip(a["runs"], b["runs"]):
        assert ra["model"] == rb["model"] and ra["steps"] == rb["steps"]
        for x, y in zip(ra["test_accuracy"], rb["test_accuracy"]):
            assert abs(x - y) <= ACC_TOL
        for q in ("15", "50", "85"):
            for x, y in zip(ra["percentiles"][q], rb["percentiles"][q]):
                assert abs(x - y) <= PCT_TOL
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["checkpoints", "figure1.png", "metrics.json", "report.md"]


def _bind_in_thread(rank: int, world: int):
    """bind_to_cores(rank, world) in a fresh thread: (what it kept, the thread's affinity
    after it). On Linux the affinity call with pid 0 binds the calling thread only, so the
    test process itself stays unbound (a child process per rank costs a torch import, 3 s)."""
    out = []
    t = threading.Thread(target=lambda: out.append((runtime.bind_to_cores(rank, world),
                                                    sorted(os.sched_getaffinity(0)))))
    t.start()
    t.join(30)
    return out[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread CPU affinity (Linux)")
def test_bind_to_cores_gives_each_local_rank_its_own_share():
    """Each local rank gets a disjoint share of the allowed cores; with more ranks than
    cores nothing is bound."""
    allowed = sorted(os.sched_getaffinity(0))
    world = 2 if len(allowed) >= 2 else 1
    shares = []
    for rank in range(world):
        kept, now = _bind_in_thread(rank, world)
        assert kept == now and set(now) <= set(allowed) and now
        shares.append(set(now))
    if world == 2:
        assert not shares[0] & shares[1] and len(shares[0]) == len(shares[1]) == len(allowed) // 2
    kept, now = _bind_in_thread(0, len(allowed) + 1)
    assert kept == now == allowed
    assert sorted(os.sched_getaffinity(0)) == allowed  # the test process was not bound


def test_process_group_gets_a_timeout(monkeypatch):
    """bnrepro's process group times out after $BNREPRO_PG_TIMEOUT_S seconds (default 300),
    not torch's 30 minutes: a rank whose peer died stops waiting. Checked on the keyword
    arguments given to init_process_group (no process group is made, nothing waits)."""
    monkeypatch.delenv("BNREPRO_PG_TIMEOUT_S", raising=False)
    assert runtime.process_group_options(False) == {"backend": "gloo", "timeout": datetime.timedelta(seconds=300)}
    assert runtime.process_group_options(True)["backend"] == "nccl"
    monkeypatch.setenv("BNREPRO_PG_TIMEOUT_S", "42.5")
    assert runtime.process_group_options(False)["timeout"] == datetime.timedelta(seconds=42.5)
    for bad in ("soon", "0", "-3", "inf", "nan"):
        monkeypatch.setenv("BNREPRO_PG_TIMEOUT_S", bad)
        with pytest.raises(runtime.UsageError, match=f"BNREPRO_PG_TIMEOUT_S must be a positive number of seconds, "
                                                     f"got '{bad}'"):
            runtime.process_group_options(False)
    # distributed() passes them on under torchrun (WORLD_SIZE > 1).
    seen = {}
    monkeypatch.setenv("BNREPRO_PG_TIMEOUT_S", "7")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("BNREPRO_BIND_CORES", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert runtime.distributed() == (1, 2)
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(seconds=7)}
