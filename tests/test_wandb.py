"""Weights & Biases logging, offline: a tiny run read back from its ``.wandb`` file, no key leaks, key detection.

wandb 0.31 ships no Python reader for the offline transaction log (its writer lives in the Go ``wandb-core``),
so ``read_transaction_log`` below parses the framing itself: wandb's 7-byte file header, then LevelDB's log
format (32 KiB blocks of ``crc32 | length | type | payload`` chunks); every payload is one
``wandb_internal_pb2.Record``, decoded with wandb's own protobuf classes.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import math
import os
import socket
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402

from metabench.report.leaderboard import OVERLAP  # noqa: E402
from metabench.report.leaderboard_csv import CSV_COLUMNS  # noqa: E402
from metabench.report.make import make_leaderboard  # noqa: E402
from metabench.report.wandb_leaderboard import log_leaderboard  # noqa: E402
from metabench.run.records import read_record  # noqa: E402
from metabench.run.runner import run  # noqa: E402
from metabench.run.wandb_logging import has_api_key  # noqa: E402
from tests.helpers import tiny_config, write_fixture  # noqa: E402

FAKE_KEY = "fake" * 10  # 40 characters: the shape of a real key
DEAD_PROXY = "http://127.0.0.1:9"  # nothing listens there: any HTTP attempt by wandb-core fails and is logged

_FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)  # ident, magic, version
_BLOCK, _CHUNK_HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_transaction_log(path: Path) -> list[pb.Record]:
    """Every record of a ``run-*.wandb`` file, checksums verified."""
    data = path.read_bytes()
    assert data[:len(_FILE_HEADER)] == _FILE_HEADER, f"{path}: not a W&B transaction log"
    records: list[pb.Record] = []
    pos, pending = len(_FILE_HEADER), b""
    while pos + _CHUNK_HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER:  # block trailer: too small for a chunk header, zero padded
            pos += left
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if (crc, length, kind) == (0, 0, 0):  # zero padding up to the end of the block
            pos += left
            continue
        payload = data[pos + _CHUNK_HEADER:pos + _CHUNK_HEADER + length]
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at byte {pos}"
        assert kind in (_FULL, _FIRST, _MIDDLE, _LAST), f"{path}: chunk type {kind} at byte {pos}"
        pos += _CHUNK_HEADER + length
        pending = payload if kind in (_FULL, _FIRST) else pending + payload
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    assert pos == len(data) and not pending, f"{path}: truncated at byte {pos} of {len(data)}"
    return records


def _items(items: Iterable[Any]) -> dict[str, Any]:
    """Config / history / summary items as ``{key: value}`` (nested keys joined with '/')."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def _of_type(records: list[pb.Record], name: str) -> list[Any]:
    return [getattr(r, name) for r in records if r.WhichOneof("record_type") == name]


@pytest.fixture
def offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """A clean W&B environment in ``tmp_path`` with no network; returns the connection attempts caught."""
    for name in list(os.environ):
        if name.startswith("WANDB_") or name in ("NETRC", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc; wandb's cache, data and config dirs land here
    monkeypatch.setenv("WANDB_SILENT", "true")
    # wandb-core (Go) honours the proxy variables: a request would fail fast and leave "proxyconnect" in its logs.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, DEAD_PROXY)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)

    # In this process: only local sockets (the wandb-core connection); anything else is recorded and refused.
    attempts: list[Any] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def local(sock: socket.socket, address: Any) -> bool:
        return sock.family == getattr(socket, "AF_UNIX", None) or (
            isinstance(address, tuple) and address[0] in ("127.0.0.1", "::1", "localhost"))

    def connect(sock: socket.socket, address: Any) -> None:
        if not local(sock, address):
            attempts.append(address)
            raise OSError(f"network disabled in this test: {address}")
        return real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        if not local(sock, address):
            attempts.append(address)
            raise OSError(f"network disabled in this test: {address}")
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    # wandb keeps its settings (read from the environment once) in a per-process singleton: start afresh.
    wandb.teardown()
    yield attempts
    wandb.teardown()


def _close_wandb() -> None:
    """Wait for wandb-core to close the run's file: ``run.finish()`` only tells it to (and it flushes the file
    every 15 s or at close), while tearing the service down waits for it to exit."""
    wandb.teardown()


def _offline_log(run_dir: Path) -> Path:
    logs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, f"expected one offline run under {run_dir / 'wandb'}, found {logs}"
    return logs[0]


def _assert_no_network_tried(attempts: list[Any], root: Path) -> None:
    assert attempts == []
    for path in root.rglob("*.log"):
        text = path.read_text(errors="replace")
        assert "proxyconnect" not in text and "127.0.0.1:9" not in text, f"{path} shows a network attempt"


def test_offline_run_reads_back(tmp_path: Path, offline_env: list[Any]) -> None:
    assert not has_api_key()  # so make_wandb_logger picks offline by itself (WANDB_MODE is unset)
    config = tiny_config(tmp_path, "maml", steps=8, extra=["logger=wandb"])
    result = run(config, progress=False)
    _close_wandb()
    record = read_record(result.record_path)
    log = _offline_log(result.run_dir)
    records = read_transaction_log(log)

    assert records[0].WhichOneof("record_type") == "header"
    (run_info,) = _of_type(records, "run")
    assert log.name == f"run-{run_info.run_id}.wandb" and log.parent.name.endswith(run_info.run_id)
    assert run_info.project == "metabench" and run_info.display_name == "synthetic-5w1s-maml-default-s0"
    assert list(run_info.tags) == ["synthetic-5w1s", "maml"]

    # The whole config, as logged by log_hyperparams (wandb adds its own "_wandb" entry).
    logged = {}
    for update in _of_type(records, "config"):
        logged.update(_items(update.update))
    assert logged["algorithm"]["name"] == "maml" and logged["benchmark"] == "synthetic-5w1s"
    assert {k: v for k, v in logged.items() if k != "_wandb"} == json.loads(json.dumps(config.to_dict()))

    # Curves: 8 steps logged every 2 -> 4 training rows; validated every 4 -> 2 validation rows.
    rows = [_items(h.item) for h in _of_type(records, "history")]
    train = [r for r in rows if "train/loss" in r]
    val = [r for r in rows if "val/accuracy" in r]
    assert len(train) == 4 and len(val) == 2
    assert all(math.isfinite(r["train/loss"]) and r["train/loss"] > 0 for r in train)
    assert all(0.0 <= r["train/accuracy"] <= 1.0 for r in train)
    assert all(0.0 <= r["val/accuracy"] <= 1.0 and r["val/accuracy_ci95"] >= 0 for r in val)
    steps = [r["trainer/global_step"] for r in train]
    assert steps == sorted(steps) and len(set(steps)) == 4

    # Final summary: log_record's values override the float32 ones Lightning logged during testing.
    summary: dict[str, Any] = {}
    for update in _of_type(records, "summary"):
        summary.update(_items(update.update))
    assert summary["test/accuracy"] == pytest.approx(record.mean, abs=1e-9)
    assert summary["test/accuracy_ci95"] == pytest.approx(record.ci95, abs=1e-9)
    assert summary["test/episode_digest"] == record.episode_digest
    assert summary["test/episodes"] == record.num_episodes == 20 and summary["train/steps"] == 8

    # The record file as an artifact of type "record": name, metadata, and its bytes (digest + staged copy).
    (artifact,) = _of_type(records, "artifact")
    assert artifact.type == "record" and artifact.name == f"record-{record.run_id}"
    assert json.loads(artifact.metadata) == {"benchmark": "synthetic-5w1s", "algorithm": "maml"}
    (entry,) = artifact.manifest.contents
    content = result.record_path.read_bytes()
    assert entry.path == result.record_path.name and entry.size == len(content)
    assert entry.digest == base64.b64encode(hashlib.md5(content).digest()).decode()
    assert Path(entry.local_path).read_bytes() == content  # the copy `wandb sync` would upload

    (exit_info,) = _of_type(records, "exit")
    assert exit_info.exit_code == 0
    _assert_no_network_tried(offline_env, tmp_path)


def test_api_key_is_never_written(tmp_path: Path, offline_env: list[Any], monkeypatch: pytest.MonkeyPatch,
                                  capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_MODE", "offline")  # a key is configured, but offline is asked for
    assert has_api_key()
    result = run(tiny_config(tmp_path, "maml", steps=2, extra=["logger=wandb"]), progress=False)
    _close_wandb()
    records = read_transaction_log(_offline_log(result.run_dir))
    assert _of_type(records, "exit")[0].exit_code == 0

    # tmp_path holds the run dir (with wandb/), the records dir and HOME (wandb's cache, data and config dirs).
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and result.record_path in files
    leaks = [p for p in files if FAKE_KEY.encode() in p.read_bytes()]
    assert leaks == []
    out, err = capfd.readouterr()
    assert FAKE_KEY not in out and FAKE_KEY not in err
    _assert_no_network_tried(offline_env, tmp_path)


_KEY = "0123456789abcdef" * 2 + "01234567"  # 40 characters: a key wandb itself would accept
_NETRC_CASES = [  # (netrc text or None, WANDB_BASE_URL or None, expected)
    (None, None, False),
    (f"machine api.wandb.ai login user password {_KEY}\n", None, True),
    (f"machine api.forge.coreweave.com login user password {_KEY}\n", None, True),  # wandb 0.31's default host
    (f"machine github.com login user password {_KEY}\n", None, False),
    ("machine api.wandb.ai login user\n", None, False),  # an entry without a key
    (f"machine api.wandb.ai login user password {_KEY}\n", "https://wandb.example.com:8443", False),
    (f"machine wandb.example.com:8443 login user password {_KEY}\n", "https://wandb.example.com:8443", True),
    (f"machine api.wandb.ai login user password {_KEY}\n", "https://api.forge.coreweave.com", True),
    (f"machine api.forge.coreweave.com login user password {_KEY}\n", "https://api.wandb.ai", False),
    (f"machine api.forge.coreweave.com login user password {_KEY}\n", "https://forge.coreweave.com/api/wandb",
     True),  # the Forge proxy address, normalized by wandb to its API host
    (f"machine api.wandb.ai login user password {_KEY}\n", "not a url", False),  # wandb refuses the address
]


@pytest.mark.parametrize("netrc_text, base_url, expected", _NETRC_CASES, ids=[
    "no-netrc", "wandb-ai", "forge", "other-host", "no-key", "custom-url-other-entry", "custom-url",
    "forge-url-upstream-entry", "wandb-url-forge-entry", "forge-proxy-url", "bad-url"])
def test_has_api_key_netrc_agrees_with_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             netrc_text: str | None, base_url: str | None, expected: bool) -> None:
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    if base_url:
        monkeypatch.setenv("WANDB_BASE_URL", base_url)
    if netrc_text is not None:
        (tmp_path / ".netrc").write_text(netrc_text)
        (tmp_path / ".netrc").chmod(0o600)
    assert has_api_key() is expected
    # Parity with wandb's own lookup, so an online run is never chosen without a key wandb can find.
    wbauth = pytest.importorskip("wandb.sdk.lib.wbauth")  # wandb's own netrc lookup (not public API)
    try:
        found = bool(wbauth.read_netrc_auth(host=base_url or wandb.Settings().base_url))
    except ValueError:  # wandb refuses the address
        found = False
    assert found is expected


def test_has_api_key_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not has_api_key()
    monkeypatch.setenv("WANDB_API_KEY", "")
    assert not has_api_key()
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert has_api_key()
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_IDENTITY_TOKEN_FILE", str(tmp_path / "token.jwt"))
    assert has_api_key()
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE")

    # $NETRC names the file; a group-readable one still counts, as wandb reads it all the same.
    elsewhere = tmp_path / "secrets" / "netrc"
    elsewhere.parent.mkdir()
    elsewhere.write_text(f"machine api.wandb.ai login user password {_KEY}\n")
    elsewhere.chmod(0o644)
    assert not has_api_key()
    monkeypatch.setenv("NETRC", str(elsewhere))
    assert has_api_key()
    monkeypatch.delenv("NETRC")
    (tmp_path / ".netrc").write_text(elsewhere.read_text())
    (tmp_path / ".netrc").chmod(0o644)
    assert has_api_key()


def test_sweep_run_logs_the_full_configuration_beside_the_sweep_parameters(
        tmp_path: Path, offline_env: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A run as `wandb agent` starts it: the environment the agent sets (sweep id, run id, the file of the run's
    parameters, in the agent's {name: {value: v}} format) and its `${args}` arguments. W&B puts the parameters into
    the run's config and locks them; the resolved configuration must still arrive, its `algorithm` section (the
    parameter `algorithm` is the name) as `algorithm_config`."""
    from metabench.cli import main
    from tests.helpers import TINY_RUN

    parameters = {"benchmark": "synthetic-5w1s", "algorithm": "maml", "seed": 1, "algorithm.inner_lr": 0.2}
    params_file = tmp_path / "sweep-params.yaml"
    params_file.write_text(json.dumps({name: {"value": value} for name, value in parameters.items()}))
    monkeypatch.setenv("WANDB_SWEEP_ID", "swp12345")
    monkeypatch.setenv("WANDB_RUN_ID", "sweeprun1")
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(params_file))
    argv = [f"--{name}={value}" for name, value in parameters.items()] + [f"--{item}" for item in TINY_RUN]
    assert main(["run", *argv, "--max-steps=2", "--accelerator=cpu", "--logger=wandb", "--quiet",
                 f"--out-dir={tmp_path / 'runs'}", f"--records-dir={tmp_path / 'records'}"]) == 0
    _close_wandb()
    (path,) = (tmp_path / "records").glob("*.json")
    record = read_record(path)
    log = _offline_log(tmp_path / "runs" / "synthetic-5w1s" / "maml-default-seed1")
    records = read_transaction_log(log)

    (run_info,) = _of_type(records, "run")
    assert run_info.run_id == "sweeprun1" and run_info.sweep_id == "swp12345"
    assert {k: v for k, v in _items(run_info.config.update).items() if k != "_wandb"} == parameters
    logged: dict[str, Any] = {}
    for update in _of_type(records, "config"):
        logged.update(_items(update.update))
    expected = json.loads(json.dumps(record.config))
    assert logged["algorithm_config"] == expected["algorithm"] and logged["algorithm_config"]["inner_lr"] == 0.2
    assert logged["trainer"] == expected["trainer"] and logged["trainer"]["seed"] == 1
    assert "algorithm" not in logged and "benchmark" not in logged  # the sweep's own, not sent again
    _assert_no_network_tried(offline_env, tmp_path)


# -- the leaderboard logged to W&B, offline --------------------------------------------------------------------


def test_wandb_leaderboard_offline(tmp_path: Path, offline_env: list[Any]) -> None:
    write_fixture(tmp_path / "records")
    result = make_leaderboard(tmp_path / "records", tmp_path / "out")
    run_dir = Path(log_leaderboard(result.tables, result.paths[2], save_dir=tmp_path / "wb",
                                   reproductions=result.reproductions))
    _close_wandb()
    (log,) = list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    records = read_transaction_log(log)
    (run_info,) = _of_type(records, "run")
    assert run_info.job_type == "leaderboard" and run_info.project == "metabench"

    # The tables: history entries pointing at the table files wandb wrote, with every CSV row in one of them:
    # the reproductions summary in "reproductions", the rest in "leaderboard".
    (row,) = [_items(h.item) for h in _of_type(records, "history")]
    csv_lines = list(csv.reader(io.StringIO(result.paths[1].read_text())))[1:]
    summary = json.loads((run_dir / row["reproductions/path"]).read_text())
    table = json.loads((run_dir / row["leaderboard/path"]).read_text())
    assert row["reproductions/_type"] == row["leaderboard/_type"] == "table-file"
    assert summary["columns"] == table["columns"] == CSV_COLUMNS
    assert summary["data"] + table["data"] == csv_lines  # the CSV, split in two, as text
    assert len(summary["data"]) == len(result.reproductions) == row["reproductions/nrows"]
    assert {r[3] for r in summary["data"]} == {"reproduction"} and "reproduction" not in {r[3] for r in table["data"]}
    (maml,) = [r for r in summary["data"] if r[:2] == ["omniglot-5w1s", "transductive, maml split, 1 query/class"]
               and r[4] == "maml" and r[5] == "conv4-omniglot"]
    assert maml[CSV_COLUMNS.index("state")] == OVERLAP
    key = ["omniglot-5w1s", "transductive, 1 query/class"]
    ranked = [r[4] for r in table["data"] if r[:2] == key and r[3] == "ranked"]
    assert ranked == ["maml", "fomaml", "reptile"]

    # The page as an artifact of type "leaderboard", byte for byte.
    (artifact,) = [a for a in _of_type(records, "artifact") if a.type == "leaderboard"]
    assert artifact.name == "leaderboard-html"
    (entry,) = artifact.manifest.contents
    assert entry.path == "leaderboard.html" and entry.size == result.paths[2].stat().st_size
    assert Path(entry.local_path).read_bytes() == result.paths[2].read_bytes()
    _assert_no_network_tried(offline_env, tmp_path)
