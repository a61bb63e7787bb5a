"""scripts/results_table.py: rows named from the metrics, ordered as the issue's table, set columns filled only where
the metrics have ``sets``; the same table from a folder of runs and from ``dvc exp show --json`` output."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("results_table", ROOT / "scripts" / "results_table.py")
rt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rt)


def entry(ip: dict[str, float], sets: dict | None = None) -> dict:
    e = {"ip": ip, "ip_mean": sum(ip.values()) / len(ip), "fidelity": 0.9, "toy_fd": 1.5, "twin_rate": 0.5}
    if sets:
        e["sets"] = sets
    return e


def run(method: str, aligned: dict, merge: str = "co_merge", **align) -> tuple[dict, dict]:
    ev = {"base": entry({"a": 1.0, "b": 0.8}), "aligned": aligned,
          "protocol": {"method": method, "merge": merge, "family": "toy", "steps": 20, "guidance": 2.0}}
    return ev, {"method": method, "build_seconds": 3.0, **align}


RUNS = [
    run("sld", entry({"a": 0.5, "b": 0.3}), preset="max"),
    run("uce", entry({"a": 0.2, "b": 0.6}, {"ood": {"ip": {"a": 0.4, "b": 0.9}, "ip_mean": 0.65}})),
    run("safetydpo", entry({"a": 0.1, "b": 0.2}), merge="single"),
    run("safetydpo", entry({"a": 0.1, "b": 0.1})),
]


def test_rows_order_names_and_set_columns() -> None:
    sets, rows, protocol = rt.build_table(RUNS)
    assert sets == ["ood"]
    assert list(rows) == ["base", "SafetyDPO (co_merge)", "All-single", "UCE", "SLD (max)"]
    assert rows["UCE"]["ip_worst"] == 0.6 and rows["UCE"]["ood_mean"] == 0.65 and rows["UCE"]["ood_worst"] == 0.9
    assert rows["SLD (max)"]["ood_mean"] is None  # no sets in that run: blank, not zero
    assert rows["base"]["ip_mean"] == 0.9 and rows["base"]["build_seconds"] is None
    md = rt.markdown(sets, rows, protocol)
    sld = next(line for line in md.splitlines() if line.startswith("| SLD (max)"))
    assert sld.split(" | ")[3:5] == ["", ""]  # the ood columns are empty
    assert "ood IP mean" in md and "20 steps" in md


def test_runs_folder_and_exp_json_give_the_same_table(tmp_path: Path) -> None:
    for i, (ev, al) in enumerate(RUNS):
        (tmp_path / "runs" / f"r{i}").mkdir(parents=True)
        (tmp_path / "runs" / f"r{i}" / "evaluate.json").write_text(json.dumps(ev))
        (tmp_path / "runs" / f"r{i}" / "align.json").write_text(json.dumps(al))

    def state(ev: dict, al: dict, name: str) -> dict:
        return {"rev": name, "name": name, "data": {"rev": name, "params": {}, "metrics": {
            rt.EVALUATE: {"data": ev}, rt.ALIGN: {"data": al}}}}

    exps = [{**state(*RUNS[0], "workspace"), "experiments": None},
            {**state(*RUNS[1], "abc"), "experiments": [{"revs": [state(ev, al, f"e{i}") for i, (ev, al) in
                                                                 enumerate(RUNS[2:])], "name": "x"}]}]
    (tmp_path / "exps.json").write_text(json.dumps(exps))
    from_runs = rt.build_table(list(rt.from_runs(tmp_path / "runs")))
    from_exps = rt.build_table(list(rt.from_exp_json(tmp_path / "exps.json")))
    assert from_runs[1] == from_exps[1]
    rt.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "table")])
    assert (tmp_path / "table.png").stat().st_size > 0 and "UCE" in (tmp_path / "table.md").read_text()


def test_attack_columns_come_from_each_run_and_the_base_row_only_from_a_none_run() -> None:
    attack_sets = {"ood": {"ip": {"a": 0.9, "b": 0.9}, "ip_mean": 0.9},
                   "whitebox": {"ip": {"a": 0.3, "b": 0.5}, "ip_mean": 0.4}}
    base_entry = entry({"a": 1.0, "b": 0.8}, attack_sets)  # base scored on prompts made against the UCE model
    uce_ev = {"base": base_entry, "aligned": entry({"a": 0.2, "b": 0.6}, attack_sets),
              "protocol": {"method": "uce", "family": "toy"}}
    uce = (uce_ev, {"method": "uce"}, {"whitebox": {"soft": {"ip": {"a": 0.75, "b": 1.0}, "ip_mean": 0.875}}})
    sets, rows, _ = rt.build_table([uce])
    assert sets == ["ood", "whitebox"]
    assert rows["UCE"]["whitebox_mean"] == 0.4 and rows["UCE"]["whitebox_soft_mean"] == 0.875
    assert rows["UCE"]["whitebox_soft_worst"] == 1.0
    assert rows["base"]["ood_mean"] == 0.9  # not an attack: the same prompts for every model
    assert rows["base"]["whitebox_mean"] is None and rows["base"]["whitebox_soft_mean"] is None  # a transfer number
    own = {"ood": attack_sets["ood"], "whitebox": {"ip": {"a": 1.0, "b": 1.0}, "ip_mean": 1.0}}
    none_ev = {"base": base_entry, "aligned": entry({"a": 1.0, "b": 0.8}, own), "protocol": {"method": "none"}}
    none = (none_ev, {"method": "none"}, {"whitebox": {"soft": {"ip": {"a": 1.0, "b": 1.0}, "ip_mean": 1.0}}})
    sets, rows, _ = rt.build_table([uce, none])
    assert list(rows) == ["base", "UCE"]  # the none run is the base row, not a row of its own
    assert rows["base"]["whitebox_mean"] == 1.0 and rows["base"]["whitebox_soft_mean"] == 1.0
    md = rt.markdown(sets, rows, {})
    assert "whitebox_soft IP mean" in md
