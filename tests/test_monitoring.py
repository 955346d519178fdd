"""Monitoring in real subprocesses: ``--summary-json``, the JSON log's last lines, the metrics file.

The end-of-run record is one JSON object on stdout and the ``run.summary.done`` log line; a fatal
error in JSON mode is a ``run.fatal.error`` line; the Prometheus file is read back with
``prometheus_client``'s own parser.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import anyio
from prometheus_client.parser import text_string_to_metric_families

from backfill.simulator import AppProfile
from tests.enginekit import ROOT, landed, sim_settings, simulator_process, write_config
from tests.simkit import TOKEN

if TYPE_CHECKING:
    from pathlib import Path

ENV = os.environ | {"FLURRY_TOKEN": TOKEN}
SMALL = AppProfile(
    name="small", api_key="SMALL00000000000APP1", sessions_per_day=4, events_per_session=2
)
RECORD_KEYS = {
    "command", "exit_code", "committed", "failed", "split", "rows", "bytes", "wall_s", "calls",
    "failures", "apps", "interrupted", "fatal",
}  # fmt: skip


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    done = await anyio.run_process(
        [sys.executable, "-m", "backfill.cli", *args], cwd=ROOT, env=env or ENV, check=False
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def _metrics(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the file: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(path.read_text())
        for s in family.samples
    }


def _json_lines(err: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in err.splitlines() if line.strip()]


async def test_summary_json_the_last_log_line_and_the_metrics_file(tmp_path: Path) -> None:
    async with simulator_process(sim_settings(apps=(SMALL,)), tmp_path) as (base, _):
        config = str(write_config(tmp_path, base, history_days=5, apps=(SMALL,)))
        metrics = tmp_path / "textfile" / "backfill.prom"
        began = time.time()
        code, out, err = await cli(
            "run", "--config", config, "--summary-json", "--log-format", "json",
            "--metrics-file", str(metrics),
        )  # fmt: skip
        assert code == 0, err
        record = json.loads(out)  # stdout is the one object, nothing else
        assert set(record) == RECORD_KEYS
        assert record["command"] == "run" and record["exit_code"] == 0
        assert record["committed"] > 0 and record["failed"] == 0 and record["failures"] == []
        assert record["rows"] == len(landed(tmp_path / "out", "small")) > 0
        assert record["apps"]["small"]["rows"] == record["rows"] and record["bytes"] > 0
        assert record["calls"]["submit"] >= record["committed"] and not record["interrupted"]

        lines = _json_lines(err)  # every stderr line is JSON in this mode
        last = lines[-1]
        assert last["event"] == "run.summary.done"
        assert {k: last[k] for k in RECORD_KEYS} == record

        samples = _metrics(metrics)
        app = (("app", "small"),)
        assert samples[("backfill_windows_committed", app)] == record["committed"]
        assert samples[("backfill_rows_landed", app)] == record["rows"]
        assert samples[("backfill_bytes_landed", app)] == record["bytes"]
        assert samples[("backfill_windows_failed", app)] == 0
        run = (("command", "run"),)
        assert samples[("backfill_last_run_exit_code", run)] == 0
        assert samples[("backfill_last_run_interrupted", run)] == 0
        assert began <= samples[("backfill_last_run_timestamp_seconds", run)] <= time.time()
        assert not list(metrics.parent.glob("*.tmp*")), "written atomically, no leftovers"

        # retry's "retrying N failed windows" goes to stderr then: stdout stays one object
        code, out, err = await cli("retry", "--config", config, "--summary-json")
        assert code == 0, err
        again = json.loads(out)
        assert again["command"] == "retry" and again["committed"] == 0 and again["calls"]
        assert "retrying 0 failed windows" in err
        code, out, _ = await cli("retry", "--config", config)
        assert out.startswith("retrying 0 failed windows\n") and "windows: 0 committed" in out


async def test_a_fatal_error_is_a_json_line_and_a_metric(tmp_path: Path) -> None:
    """A refused token in JSON mode: exit 3, ``run.fatal.error`` last, the exit code metric."""
    async with simulator_process(sim_settings(apps=(SMALL,)), tmp_path) as (base, _):
        config = write_config(tmp_path, base, history_days=3, apps=(SMALL,))
        metrics = tmp_path / "node" / "backfill.prom"
        text = config.read_text().replace("[output]\n", f'[output]\nmetrics_file = "{metrics}"\n')
        config.write_text(text)
        wrong = "WRONG-TOKEN-0123456789"
        env = ENV | {"FLURRY_TOKEN": wrong}
        code, out, err = await cli(
            "sync", "--config", str(config), "--log-format", "json", "--summary-json", env=env
        )
        assert code == 3, err
        assert out == "", "no record of a run that could not run"
        lines = _json_lines(err)
        fatal = lines[-1]
        assert fatal["event"] == "run.fatal.error" and fatal["level"] == "error"
        assert fatal["exit_code"] == 3 and "check the token" in fatal["message"]
        assert "backfill: error" not in err and wrong not in err
        samples = _metrics(metrics)
        assert samples[("backfill_last_run_exit_code", (("command", "sync"),))] == 3
        assert not any(name == "backfill_windows_committed" for name, _ in samples)

        code, _, err = await cli("sync", "--config", str(config), "--log-format", "console",
                                 env=env)  # fmt: skip
        assert code == 3 and "backfill: error:" in err and "run.fatal.error" not in err
