"""Sharded certification: 2 gloo processes equal 1 process; killed runs resume; foreign shards are refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import spread_model

from scalecert import results as R
from scalecert.models import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    # fp32: spread_model's head overflows fp16
    save_checkpoint(spread_model(rate=0.1), d / "m.pt", {"name": "spread", "dataset_key": "cifar10"}, half=False)
    return d / "m.pt"


def run(args, launcher=(sys.executable, "-m", "scalecert"), check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", SCALECERT_TEST_THREADS="1")
    p = subprocess.run([*launcher, "certify", *args], capture_output=True, text=True, cwd=ROOT, env=env)
    if check and p.returncode != 0:
        raise AssertionError(p.stderr[-3000:])
    return p


def args(ckpt, tmp, out, cache="cache"):
    return [
        "--checkpoint",
        str(ckpt),
        "--dataset",
        "cifar10",
        "--images",
        "20",
        "--patch",
        "5",
        "--tau",
        "0.3",
        "--chunk-images",
        "4",
        "--cache-dir",
        str(tmp / cache),
        "--out",
        str(tmp / out),
        "--device",
        "cpu",
    ]


def test_two_gloo_processes_equal_one(ckpt, tmp_path):
    run(args(ckpt, tmp_path, "one.csv", "c1"))
    run(
        args(ckpt, tmp_path, "two.csv", "c2"),
        launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "scalecert"),
    )
    one, two = (tmp_path / "one.csv").read_text(), (tmp_path / "two.csv").read_text()
    assert one == two
    df = pd.read_csv(tmp_path / "one.csv")
    assert len(df) == 20 and df["id"].is_unique
    t = R.timings(next((tmp_path / "c2").iterdir()))
    assert sorted(t.chunk) == list(range(5))  # each chunk computed once, by one of the two ranks


def test_killed_run_resumes_with_every_image_once(ckpt, tmp_path):
    p = run(args(ckpt, tmp_path, "x.csv", "c") + ["--fail-after", "2"], check=False)
    assert p.returncode != 0 and not (tmp_path / "x.csv").exists()
    cache = next((tmp_path / "c").iterdir())
    assert len(list(cache.glob("chunk-*.csv"))) == 2
    run(args(ckpt, tmp_path, "x.csv", "c"))
    assert len(R.timings(cache)) == 5  # the two finished chunks were not recomputed
    run(args(ckpt, tmp_path, "ref.csv", "ref"))
    assert (tmp_path / "x.csv").read_text() == (tmp_path / "ref.csv").read_text()


def test_foreign_shard_is_refused(tmp_path):
    a = R.open_run({"x": 1}, tmp_path)
    b = R.open_run({"x": 2}, tmp_path)
    frame = pd.DataFrame({"id": [0, 1], "pred": [3, 4]})
    R.compute(a, 2, 2, lambda r: frame.iloc[list(r)], progress=False)
    (b / "chunk-00000.csv").write_text((a / "chunk-00000.csv").read_text())
    with pytest.raises(R.CacheMismatch, match="another configuration|made with configuration"):
        R.merge(b, 2, 2)
    assert R.merge(a, 2, 2, ids=[0, 1])["pred"].tolist() == [3, 4]
    (a / "config.json").write_text('{"x": 3}')
    with pytest.raises(R.CacheMismatch, match="another configuration"):
        R.open_run({"x": 1}, tmp_path)


@pytest.mark.parametrize("key", ["4590e25879323460", "0000000000001234", "1e5"])
def test_numeric_looking_config_keys_still_merge(tmp_path, key):
    run = tmp_path / key  # keys are hex strings; some look like numbers to a CSV reader
    run.mkdir()
    R.compute(run, 2, 2, lambda r: pd.DataFrame({"id": list(r), "pred": [7, 8]}), progress=False)
    assert R.merge(run, 2, 2, ids=[0, 1])["config_key"].tolist() == [key, key]


def test_cache_status_counts_chunks_and_images_and_survives_an_interruption(tmp_path, capsys):
    from scalecert import cli

    run = R.open_run({"dataset": "cifar10", "mode": "sound", "patch": 2.4}, tmp_path)
    fn = lambda r: pd.DataFrame({"id": list(r), "pred": [0] * len(r)})  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        R.compute(run, 5, 2, fn, progress=False, fail_after=1)
    row = R.status(tmp_path).iloc[0]
    assert (row.chunks_done, row.chunks, row.images_done, row.images) == (1, 3, 2, 5)
    assert row.dataset == "cifar10" and row["mode"] == "sound" and row.eta_hours >= 0
    assert cli.cache(["--dir", str(tmp_path), "--unfinished"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["runs"] == 1
    R.compute(run, 5, 2, fn, progress=False)
    row = R.status(tmp_path).iloc[0]
    assert (row.chunks_done, row.images_done, row.eta_hours) == (3, 5, 0)
    cli.cache(["--dir", str(tmp_path), "--unfinished"])
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"runs": 0, "eta_hours": 0.0, "eta_unknown": 0}


_SIDE_BY_SIDE = """
import sys, time
from pathlib import Path
import pandas as pd
from scalecert import results as R
run = R.open_run({"x": "shared"}, Path(sys.argv[1]))
def fn(r):
    with open(Path(sys.argv[1]) / "calls.txt", "a") as f:
        f.write(f"{sys.argv[2]} {r.start}\\n")
    # the first chunk of each process waits until the other process computes a chunk too (at most 20 s): with
    # locks that make a process queue behind the other one instead of moving on, it waits in vain
    (Path(sys.argv[1]) / f"in-{sys.argv[2]}").touch()
    t = time.time()
    while len(list(Path(sys.argv[1]).glob("in-*"))) < 2 and time.time() - t < 20:
        time.sleep(0.05)
    time.sleep(0.3)
    return pd.DataFrame({"id": list(r), "pred": [int(sys.argv[2])] * len(r)})
print(R.compute(run, 8, 2, fn, progress=False))
"""


def test_notebooks_side_by_side_compute_each_chunk_of_a_shared_run_once(tmp_path):
    """Two processes that need the same run at once share its chunks: each computes some, none is computed twice, the
    merge is whole."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SIDE_BY_SIDE, str(tmp_path), str(k)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        for k in (1, 2)
    ]
    computed = [int(p.communicate(timeout=60)[0].split()[-1]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    calls = (tmp_path / "calls.txt").read_text().split("\n")[:-1]
    starts = sorted(int(c.split()[1]) for c in calls)
    assert starts == [0, 2, 4, 6] and sum(computed) == 4  # each of the 4 chunks exactly once
    assert min(computed) >= 1  # and the work is split: a process passes over the chunk the other one holds
    run = R.open_run({"x": "shared"}, tmp_path)
    assert R.merge(run, 8, 2, ids=list(range(8)))["id"].tolist() == list(range(8))
    # a lock is released when its holder dies, however it dies
    with R.exclusive("held", tmp_path):
        pass
    killed = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from scalecert "
            "import results as R\nwith R.exclusive('held', Path(sys.argv[1])):\n "
            "print('in', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert killed.stdout.readline().strip() == "in"
    with R.exclusive("held", tmp_path, wait=False) as held:
        assert held is False  # held by the other process: not waited for
    killed.kill()
    killed.wait()
    with R.exclusive("held", tmp_path, wait=False) as held:
        assert held is True
    with R.exclusive("held", tmp_path):
        pass
