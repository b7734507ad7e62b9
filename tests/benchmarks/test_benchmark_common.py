"""benchmarks/common.py: the machine description and the results writer every benchmark script uses."""

import json
import time

import numpy as np
import pytest
import torch

from benchmarks.common import cpu_model, describe, machine, markdown_table, time_calls, write_results


def test_machine_describes_this_process():
    m = machine()
    assert 1 <= m["usable_cores"] <= m["logical_cores"]
    assert m["torch_threads"] == torch.get_num_threads()
    assert m["torch"] == str(torch.__version__)
    assert (m["gpu"] is None) == (not torch.cuda.is_available())
    assert len(m["load_average"]) == 3 and m["memory_gib"] > 0
    assert json.loads(json.dumps(m)) == m  # goes into results files as it is
    assert f"{m['logical_cores']} logical cores ({m['usable_cores']} usable)" in describe(m)
    assert describe(m).startswith(m["cpu_model"])


def test_write_results_writes_the_file_and_prints_one_json_line_last(tmp_path, capsys):
    results = {"auc": np.float32(0.75), "rows": [np.float64(1.5)], "machine": {"logical_cores": 2}}
    out = tmp_path / "new" / "folder" / "results.json"
    print("a table")
    write_results(results, out, as_json=True)
    written = json.loads(out.read_text())
    assert written == {"auc": 0.75, "rows": [1.5], "machine": {"logical_cores": 2}}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "a table" and json.loads(lines[-1]) == written and len(lines) == 2


def test_write_results_prints_the_last_line_asked_for_and_nothing_without_json(tmp_path, capsys):
    write_results({"full": 1}, None, as_json=True, last_line={"summary": 2})
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"summary": 2}
    out = tmp_path / "r.json"
    write_results({"full": 1}, out, as_json=False)
    assert capsys.readouterr().out == "" and json.loads(out.read_text()) == {"full": 1}


def test_time_calls_runs_warmup_untimed_then_times_each_repeat():
    seen = []
    timing = time_calls(lambda i: (seen.append(i), time.sleep(0.002 if i == 2 else 0)), repeats=3, warmup=2)
    assert seen == [0, 1, 2, 3, 4]  # warm-up calls first, the index goes on counting
    assert len(timing.samples_s) == 3 and timing.samples_s[0] >= 0.002  # index 2: the first timed call
    assert min(timing.samples_s) <= timing.median_s <= timing.p99_s <= max(timing.samples_s)
    assert timing.median_ms == timing.median_s * 1000
    with pytest.raises(ValueError):
        time_calls(lambda i: None, repeats=0)


def test_markdown_table_escapes_pipes_and_refuses_ragged_rows():
    table = markdown_table(["model", "AUC"], [["a|b", 0.75], ["c", 0.5]])
    assert table.splitlines() == ["| model | AUC |", "|---|---|", "| a\\|b | 0.75 |", "| c | 0.5 |"]
    with pytest.raises(ValueError):
        markdown_table(["model", "AUC"], [["only one cell"]])


def test_cpu_model_is_the_kernels_model_name():
    lines = [line for line in open("/proc/cpuinfo").read().splitlines() if line.startswith("model name")]
    assert cpu_model() == (lines[0].split(":", 1)[1].strip() if lines else cpu_model())
