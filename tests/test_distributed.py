"""Multi-process ES (fastes.es.distributed) on CPU with gloo: torchrun children vs an in-process single run.

Each torchrun launch costs seconds of imports, so the three launches (clean, corrupted
rank, killed rank) share one tiny model and one config, and the single-process
reference run is done once, in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_model import DIGIT_TASK, make_tiny_model

from fastes.es import checkpoint as ckpt
from fastes.es.config import TrainConfig
from fastes.es.distributed import FAULT_ENV, checksums, deal, tensor_checksum
from fastes.es.logger import read_metrics
from fastes.es.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 members (4 antithetic pairs) on 4 prompts, eval split over ranks, a checksum check after every step."""
    root = tmp_path_factory.mktemp("dist")
    model = make_tiny_model(root / "tiny", seed=0)
    data = dict(model=str(model), task=DIGIT_TASK, device="cpu", steps=STEPS, seed=0, prompts_per_step=4, eval_every=2,
                eval_size=4, progress=False, tensorboard=False, kv_cache_tokens=4096,
                population=dict(size=8, mode="lowrank", rank=2, sigma=0.1, perturb_lm_head=True),
                optim=dict(name="momentum", lr=0.05), sampling=dict(max_tokens=6, temperature=0.0),
                distributed=dict(check_every=1, timeout_s=30))
    file = root / "config.yaml"
    file.write_text(yaml.safe_dump(data))
    return file


def torchrun(config: Path, out: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node 2 -m fastes train` with one thread per child."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", FAULT_ENV)}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    if fault:
        env[FAULT_ENV] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fastes",
           "train", "--config", str(config), "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)


def weights(run_dir: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.find_checkpoint(run_dir) / name))


def assert_same_weights(a: Path, b: Path) -> None:
    for file in ("model.safetensors", ckpt.OPTIM_FILE):
        wa, wb = weights(a, file), weights(b, file)
        assert wa.keys() == wb.keys()
        for name in wa:
            assert torch.equal(wa[name], wb[name]), (file, name)


@pytest.fixture(scope="module")
def single(config_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same config in one process (no process group)."""
    out = tmp_path_factory.mktemp("single") / "run"
    Trainer(TrainConfig.from_yaml(config_file, ["--out", str(out)])).train()
    return out


# ---------------------------------------------------------------------- in-process units


def test_deal_keeps_pairs_together_and_balances():
    shares = deal(10, 3, antithetic=True)  # 5 pairs over 3 ranks: the first two ranks get one more pair
    assert shares == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert deal(7, 2, antithetic=False) == [[0, 1, 2, 3], [4, 5, 6]]
    for n, world in ((32, 4), (30, 4), (8, 4), (64, 3)):
        shares = deal(n, world, antithetic=True)
        assert sorted(m for s in shares for m in s) == list(range(n))
        assert all(len(s) % 2 == 0 and s[0] % 2 == 0 for s in shares)  # whole pairs only
        assert max(map(len, shares)) - min(map(len, shares)) <= 2
    with pytest.raises(ValueError, match="cannot be split over 5 ranks"):
        deal(8, 5, antithetic=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cols", [1000, 333])  # 8-byte words, or element-sized ones when the size is odd
def test_checksum_sees_any_single_element_change(dtype, cols):
    t = torch.randn(3, cols).to(dtype)
    ref = tensor_checksum(t)
    assert torch.equal(tensor_checksum(t.clone()), ref)
    for index in (0, cols + 1, 3 * cols - 1):
        for bit in (0, 7, 15):  # one flipped bit, low or high
            u = t.clone()
            u.view(torch.int16).view(-1)[index * t.element_size() // 2] ^= 1 << bit
            assert not torch.equal(u, t) and not torch.equal(tensor_checksum(u), ref)
    inner = torch.randn(1001)[1:]  # an unaligned view: summed as an aligned copy
    assert torch.equal(tensor_checksum(inner), tensor_checksum(inner.clone()))
    assert checksums({"b": t, "a": t[:1]}).shape == (2,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [1000, 333])
def test_checksum_sees_permuted_rows_and_elements(dtype, cols):
    t = torch.randn(4, cols).to(dtype)
    ref = tensor_checksum(t)
    for perm in ([1, 0, 2, 3], [3, 1, 2, 0], [1, 2, 3, 0]):  # swapped rows, a cycle: the same multiset of bytes
        assert not torch.equal(tensor_checksum(t[perm].contiguous()), ref), perm
    u = t.clone().reshape(-1)
    u[[5, 6]] = u[[6, 5]]  # two neighbours swapped (inside one 8-byte word for 16-bit types)
    assert not torch.equal(tensor_checksum(u.reshape(t.shape)), ref)
    assert torch.equal(tensor_checksum(t.clone()), ref)


def test_engine_generates_a_subset_of_members_exactly(config_file):
    from fastes import Population
    from fastes.engine.engine import Engine
    from fastes.engine.sampling import SamplingParams

    engine = Engine.from_pretrained(yaml.safe_load(config_file.read_text())["model"], kv_cache_tokens=1024)
    pop = Population(size=6, sigma=0.1, mode="lowrank", rank=2, seed=3)
    sampling = SamplingParams(max_tokens=5, temperature=0.8, seed=7)
    prompts = ["12+3=", "abc"]
    full = engine.generate(prompts, sampling=sampling, population=pop, step=1, samples_per_prompt=2)
    part = engine.generate(prompts, sampling=sampling, population=pop, step=1, samples_per_prompt=2,
                           members=[4, 5, 1])
    for i, m in enumerate([4, 5, 1]):
        assert [[c.token_ids for c in p] for p in part[i]] == [[c.token_ids for c in p] for p in full[m]]
    with pytest.raises(ValueError, match="member"):
        engine.generate(prompts, sampling=sampling, population=pop, members=[6])
    with pytest.raises(ValueError, match="distinct"):
        engine.generate(prompts, sampling=sampling, population=pop, members=[1, 1])


# ---------------------------------------------------------------------- torchrun, 2 processes


def test_two_processes_give_bit_identical_weights(config_file, single, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(config_file, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(single, out)
    records = read_metrics(out)
    checks = [r for r in records if "dist/mismatch" in r]
    assert [r["dist/checked_step"] for r in checks] == list(range(STEPS + 1))  # at start, then after each step
    assert not any(r["dist/mismatch"] for r in checks)
    train = [r for r in records if "reward/mean" in r]
    ref = [r for r in read_metrics(single) if "reward/mean" in r]
    assert [r["reward/mean"] for r in train] == [r["reward/mean"] for r in ref]  # all members' rewards gathered
    assert ckpt.find_checkpoint(out).name == f"step-{STEPS}"


def test_checksum_guard_repairs_a_corrupted_rank(config_file, single, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(config_file, out, fault="corrupt:1:1")  # rank 1 changes one weight after step 1
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 broadcasts its weights" in proc.stderr
    checks = [r for r in read_metrics(out) if "dist/mismatch" in r]
    bad = [r for r in checks if r["dist/mismatch"]]
    assert len(bad) == 1 and bad[0]["dist/checked_step"] == 1 and bad[0]["dist/repaired_ranks"] == [1]
    assert bad[0]["dist/drifted_tensors"] == ["param/lm_head.weight"]
    # the next checks see equal weights on both ranks, and the run ends where the clean one does
    assert [r["dist/checked_step"] for r in checks if not r["dist/mismatch"]] == [0, 2, 3, 4]
    assert_same_weights(single, out)


def test_a_killed_rank_ends_the_job_and_the_checkpoint_resumes_on_one_process(config_file, single, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(config_file, out, "--save_every", "1", "--timeout_s", "10", fault="kill:1:2")
    assert proc.returncode != 0
    assert "SIGKILL" in proc.stderr or "distributed run stopped" in proc.stderr, proc.stderr[-3000:]
    last = ckpt.find_checkpoint(out)
    assert last.name == "step-1" and ckpt.load_state(last)["step"] == 1
    # the state is (seed, step, weights, optimizer): resume with another world size, end where the clean run ends
    config = TrainConfig.from_yaml(config_file, ["--out", str(out), "--resume", str(out)])
    resumed = Trainer(config)
    assert resumed.start_step == 1
    resumed.train()
    assert_same_weights(single, out)


HUNG_PEER = """
import os, sys, time, types, torch
from fastes.es.config import TrainConfig
from fastes.es.distributed import Distributed, DistributedError
config = TrainConfig.from_dict({"model": "m", "task": "t", "population": {"size": 4},
                                "distributed": {"timeout_s": 2}})
group = Distributed.from_env(config, "cpu")
if group.rank == 1:
    time.sleep(60)  # alive but silent: rank 0 must not wait for it forever
try:
    group.gather_fitness(torch.zeros(2), types.SimpleNamespace(size=4, antithetic=True))
except DistributedError as err:
    print(err, flush=True)
    os._exit(3)  # skip interpreter teardown: gloo's threads may still hold the broken pair and abort() in C++ dtors
"""


def test_a_hung_rank_times_out_with_a_clear_error():
    """The process-group timeout turns a silent peer into a DistributedError (two bare processes: no torchrun)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    base.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                PYTHONPATH=str(ROOT) + os.pathsep + base.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", HUNG_PEER], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=dict(base, RANK=str(r), LOCAL_RANK=str(r))) for r in (0, 1)]
    try:
        out, err = procs[0].communicate(timeout=60)
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode == 3, err[-2000:]
    assert "rank 0/2: all-gather of fitness failed" in out and "timeout 2s" in out, out


# ---------------------------------------------------------------------- torchrun, 2 nodes (the README recipe)


def two_nodes(config: Path, out: Path, *extra: str, fault: str | None = None) -> list[subprocess.Popen]:
    """The README's multi-node recipe on one machine: two torchrun agents, --nnodes 2, c10d rendezvous on
    127.0.0.1, one gloo process per "node"."""
    import socket
    import uuid

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", FAULT_ENV)}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    if fault:
        env[FAULT_ENV] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", uuid.uuid4().hex[:8],
           "--local-addr", "127.0.0.1", "--max-restarts", "0",
           "-m", "fastes", "train", "--config", str(config), "--out", str(out), *extra]
    return [subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(2)]


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    try:
        results = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, err) for p, (_, err) in zip(procs, results, strict=True)]


@pytest.mark.slow  # about 30 s each on 2 cores: two torchrun agents, c10d rendezvous
def test_two_nodes_with_c10d_rendezvous_match_one_process(config_file, single, tmp_path):
    out = tmp_path / "run"
    results = finish(two_nodes(config_file, out))
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert_same_weights(single, out)


@pytest.mark.slow  # about 30 s each on 2 cores: two torchrun agents, c10d rendezvous
def test_a_killed_node_ends_the_other_with_one_line_and_the_run_resumes(config_file, single, tmp_path):
    out = tmp_path / "run"
    # whichever node holds rank 0 loses it (SIGKILL) after step 2; the other node must stop, not hang
    results = finish(two_nodes(config_file, out, "--save_every", "1", "--timeout_s", "10", fault="kill:0:2"))
    survivor = [(rc, err) for rc, err in results if "fastes: error:" in err]
    assert len(survivor) == 1, results
    rc, err = survivor[0]
    lines = [line for line in err.splitlines() if line.startswith("fastes:")]  # torchrun adds its own report
    assert rc == 1 and len(lines) == 1 and "distributed run stopped" in lines[0], err[-3000:]
    assert ckpt.find_checkpoint(out).name == "step-1"  # the kill comes before step-2 is saved
    resumed = Trainer(TrainConfig.from_yaml(config_file, ["--out", str(out), "--resume", str(out)]))
    assert resumed.start_step == 1
    resumed.train()
    assert_same_weights(single, out)
